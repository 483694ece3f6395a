"""export stage: a trained model as ONNX / OpenVINO graphs for the fastest CPU and server runtimes, each reloaded
in a fresh process and re-scored beside the torch model it came from.

input model -> ONNX (torch.onnx, dynamo exporter) -> ONNX Runtime int8 (dynamic; static, calibrated on rows of
the card's train split) -> OpenVINO IR (fp32; int8 weights by NNCF) -> a fresh process loads every folder with
its runtime (pipelines.runtimes) and scores it with the task's own metrics, latency and size, beside the torch
model -> quality gate.

Formats (`formats:`), one folder each under the stage's folder, each a self-contained model folder (config.json,
processor files, the graph, export.json) that `pipelines serve` serves with its runtime:
  onnx               model.onnx in fp32 (torch.onnx.export(dynamo=True)), run by ONNX Runtime
  onnx_int8_dynamic  ONNX Runtime's quantize_dynamic: int8 weights (per channel), activations quantized on the fly
  onnx_int8_static   ONNX Runtime's quantize_static (QDQ) of the matrix products: int8 weights and activations,
                     activation ranges calibrated on `calibration_samples` train rows
  openvino           openvino_model.xml + .bin in fp32 (converted from model.onnx), run by OpenVINO
  openvino_int8      the same with int8 weights (NNCF compress_weights, data-free), run by OpenVINO
  openvino_int8_static  int8 weights and activations (NNCF quantize, transformer preset), activation ranges
                     calibrated on `calibration_samples` train rows: the fastest CPU path measured (bench/README.md)

Why not optimum's exporters (optimum-onnx, optimum-intel): their releases pin transformers < 4.58 and < 5.6 and
this project needs transformers >= 5, so the stage calls the pieces they are built on directly: torch.onnx,
onnxruntime.quantization, openvino and nncf. Tasks whose evaluation is one forward pass export (classification,
multi-label, token and image classification).

Generative models are exported by transformers' own exporter (transformers.exporters, transformers >= 5.25) as
ONNX graphs over a KV cache, traced on the steps decompose_for_generation captures from a real generate(), every
axis dynamic: a causal LM (Task.export_graph "decode") as one multi-token decode graph, which is the prefill (an
empty cache) and every step; an encoder-decoder (translation, summarisation: "encoder-decoder") as an encoder, a
decoder prefill and a decoder step. Formats onnx, onnx_int8_dynamic, openvino and openvino_int8 (the calibrated
static int8 ones are refused); pipelines.runtimes_lm puts them behind transformers' generate().
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipelines import basemodel, modelio, runtimes, tasks
from pipelines.checkpoints import atomic_write_json
from pipelines.errors import PipelinesError
from pipelines.stage import Evaluation, RunContext, StageConfig, StageDef, StageResult

Format = Literal["onnx", "onnx_int8_dynamic", "onnx_int8_static", "openvino", "openvino_int8", "openvino_int8_static"]
RUNTIME = {"onnx": "onnxruntime", "onnx_int8_dynamic": "onnxruntime", "onnx_int8_static": "onnxruntime",
           "openvino": "openvino", "openvino_int8": "openvino", "openvino_int8_static": "openvino"}
GRAPH = {"onnxruntime": "model.onnx", "openvino": "openvino_model.xml"}  # optimum's file names
# the formats graphs over a KV cache (Task.export_graph "decode", "encoder-decoder") are written as
GENERATIVE_FORMATS = ("onnx", "onnx_int8_dynamic", "openvino", "openvino_int8")


class ExportConfig(StageConfig):
    model_path: str | None = Field(None, description="A local HF model folder (relative to the recipe), instead of a `model` input.")
    formats: list[Format] = Field(default_factory=lambda: ["onnx"], min_length=1,
                                  description="Folders to write: onnx, onnx_int8_dynamic, onnx_int8_static, openvino, "
                                  "openvino_int8, openvino_int8_static.")
    serve: Format | None = Field(None, description="The format that is the stage's `model` output (what serve and publish "
                                 "take); default: the first of `formats`.")
    opset: int = Field(18, ge=18, description="ONNX opset of the exported graph (torch's dynamo exporter starts at 18).")
    openvino_precision: Literal["f32", "bf16"] = Field(
        "f32", description="OpenVINO's inference precision for what is not int8 (its CPU default is bf16 where the CPU "
        "has it, which would not be the fp32 model).")
    per_channel: bool = Field(True, description="ONNX Runtime int8: one weight scale per output channel (else per tensor).")
    calibration_samples: int = Field(64, ge=1, description="onnx_int8_static, openvino_int8_static: train rows (seeded "
                                     "sample) whose activations set the int8 ranges.")
    max_length: int = Field(128, ge=8, description="Tokens per eval input (truncation), as in the finetune stage.")
    max_eval_samples: int | None = Field(None, ge=1)
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Those the card has.")
    latency_batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(20, ge=1)
    max_metric_drop: float | None = Field(
        None, ge=0, description="Quality gate: fail when an exported model's main metric on validation is worse than the "
        "torch model's by more than this, in the metric's units (accuracy 0.01 = one point).")

    @model_validator(mode="after")
    def _serve_is_written(self):
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats lists a format twice: {self.formats}")
        if self.serve is not None and self.serve not in self.formats:
            raise ValueError(f"serve: {self.serve!r} is not one of formats {self.formats}")
        return self

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = basemodel.local_folder(self.model_path, recipe_dir)
        return {"model_path": folder} if folder else {}

    @property
    def served(self) -> str:
        return self.serve or self.formats[0]


# ---------------------------------------------------------------- exporting


def export_onnx(model, task, sample: dict, path: Path, opset: int) -> list[str]:
    """torch -> model.onnx with the task's outputs, batch (and, for token inputs, sequence) dimensions dynamic.
    Returns the graph's input names."""
    import warnings

    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {k: ({0: batch, 1: seq} if v.dim() == 2 else {0: batch}) for k, v in sample.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (), str(path), kwargs=sample, input_names=list(sample),
                          output_names=list(task.export_outputs), dynamic_shapes=shapes, opset_version=opset,
                          dynamo=True, optimize=True, verbose=False, external_data=False)
    return list(sample)


def capture_prompts(model, sample: dict) -> dict:
    """Two rows of the sample, one padded (left for a decoder, right for an encoder): a capture whose mask is all
    ones traces graphs that take none (generate() drops it), and those would attend to the padding of every batch."""
    import torch

    ids = sample["input_ids"][:2, :8].clone()
    # two rows of at least four tokens: torch.export fixes an axis it sees at size 1 (a batch-1 graph), and the padded
    # row keeps two real tokens
    ids = ids.repeat(2 // ids.shape[0], 1) if ids.shape[0] == 1 else ids
    while ids.shape[1] < 4:
        ids = torch.cat([ids, ids], dim=1)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    where = (0, slice(0, 2)) if not model.config.is_encoder_decoder else (-1, slice(-2, None))
    mask[where], ids[where] = 0, pad
    return {"input_ids": ids, "attention_mask": mask}


def generation_config_for_export(config):
    """A copy that generates over a DynamicCache: the graphs take one of any length (a static / hybrid / sliding
    cache_implementation would trace fixed-size caches and 4D masks, use_cache False a graph without one)."""
    import copy

    config = copy.deepcopy(config)
    config.cache_implementation, config.use_cache = "dynamic", True  # None would fall back on the model's own
    return config


def generation_steps(model, sample: dict) -> dict:
    """{graph: (module, its forward's keyword arguments)} of a generative model, captured by
    decompose_for_generation from a real greedy generate() on two of the sample's prompts. A decoder: one graph
    `model`, the multi-token decode step (prefill = an empty cache). An encoder-decoder: `encoder`; `prefill` (the
    first decoder tokens on an empty cache: it fills the cross-attention cache) and `decode`, each given two decoder
    tokens so that their token axis stays dynamic (a teacher-forced pass is the encoder + prefill)."""
    import warnings

    import torch
    from transformers.exporters.utils import decompose_for_generation

    prompts = capture_prompts(model, sample)
    # captured greedily: a model whose generation config beam-searches would trace its steps at batch x beams
    greedy = generation_config_for_export(model.generation_config)
    greedy.num_beams, greedy.do_sample, greedy.num_return_sequences = 1, False, 1
    with warnings.catch_warnings(), torch.inference_mode(False):  # tensors the export can trace
        warnings.simplefilter("ignore")
        steps = decompose_for_generation(model.eval(), prompts, generation_config=greedy, multi_token_decode=True)
    # the flags are generate()'s, not graph inputs (the exporter drops them)
    steps = {name: (module, {k: v for k, v in inputs.items() if k not in ("use_cache", "return_dict")})
             for name, (module, inputs) in steps.items()}
    if not model.config.is_encoder_decoder:
        return {"model": steps["decode"]}
    traced = {"encoder": (model.get_encoder(), prompts)}
    for name in ("prefill", "decode"):
        module, inputs = steps[name]
        one = inputs["decoder_input_ids"][:, -1:]  # two decoder tokens: the token axis stays dynamic
        traced[name] = (module, {**inputs, "decoder_input_ids": torch.cat([one, one], dim=1)})
    return traced


def export_generative(model, steps: dict, backend: str, opset: int = 18):
    """The generation_steps of a model -> transformers.exporters' ExportedModel of graphs over a KV cache (backend
    "onnx" or "openvino", fp32), every axis dynamic. Returns it and {graph: the traced forward's arguments}."""
    import copy
    import warnings

    import torch
    from transformers.exporters import ExportedModel, OnnxConfig, OnnxExporter, OpenVINOConfig, OpenVINOExporter

    # OpenVINO: a decoder's cache folded into the compiled model (stateful, with a beam_idx input for beam search);
    # an encoder-decoder's as inputs and outputs, as in ONNX (its prefill graph fills the cache its decode graph reads)
    exporter, config = ((OnnxExporter(), OnnxConfig(dynamic=True, opset_version=opset)) if backend == "onnx" else
                        (OpenVINOExporter(), OpenVINOConfig(dynamic=True, stateful=not model.config.is_encoder_decoder)))
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        # a copy of the inputs each time: tracing may grow their caches, and the steps serve every backend
        graphs = {name: exporter.export(module, copy.deepcopy(inputs), config).components["model"]
                  for name, (module, inputs) in steps.items()}
    exported = ExportedModel(graphs, exporter.export_format, config=model.config,
                             generation_config=generation_config_for_export(model.generation_config))
    return exported, {name: list(inputs) for name, (_, inputs) in steps.items()}


def quantize_onnx(src: Path, dst: Path, static_reader, per_channel: bool, external_data: bool = False) -> dict:
    """ONNX Runtime int8: dynamic (static_reader None) or static QDQ calibrated by the reader's batches. With
    external_data the weights go to <dst>.data, as transformers.exporters writes and reads them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    dst.parent.mkdir(parents=True, exist_ok=True)
    pre = dst.with_name("preprocessed.onnx")
    for stale in (dst.with_name(dst.name + ".data"), pre.with_name(pre.name + ".data")):
        stale.unlink(missing_ok=True)  # onnx appends external weights to an existing file (a resumed stage)
    # shape inference + graph clean-up; ONNX Runtime's clean-up pass loses a graph's external weights file (and the
    # decode graph comes out of transformers.exporters already optimized)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=external_data,
                      save_as_external_data=external_data, all_tensors_to_one_file=True,
                      external_data_location=pre.name + ".data")
    try:
        if static_reader is None:
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             use_external_data_format=external_data)
            return {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8", "per_channel": per_channel,
                    "activations": "uint8, ranges computed per batch"}
        # MatMul / Gemm only: with every op ONNX Runtime can quantize (Softmax, Add, LayerNorm outputs...) the MiniLM's
        # SST-2 dev accuracy fell 9.75 points, with the matrix products alone 1.15 (bench/README.md)
        quantize_static(str(pre), str(dst), static_reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return {"method": "onnxruntime.quantization.quantize_static (QDQ, MinMax calibration, MatMul / Gemm)", "weights": "int8",
                "per_channel": per_channel, "activations": "uint8, ranges calibrated", "calibration_rows": static_reader.rows}
    finally:
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)


class Calibration:
    """onnxruntime's CalibrationDataReader over batches of train rows, encoded and collated as the task does."""

    def __init__(self, task, processor, raw, opts, input_names: list[str], batch_size: int = 16):
        from pipelines.tasks.base import batches

        self.rows = len(raw)
        data = task.encode(raw, processor, opts)
        self._batches = iter([{k: v.numpy() for k, v in b.items() if k in input_names}
                              for b in batches(data, task.collator(processor), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def to_openvino(src: Path, dst: Path, int8: str | None, calibration: Calibration | None = None) -> dict:
    """ONNX -> OpenVINO IR (fp32 kept: save_model would halve weights to fp16); int8 "weights": NNCF compress_weights
    (data-free), "static": NNCF quantize (weights and activations, transformer preset) calibrated on real batches."""
    import openvino as ov

    model = ov.convert_model(str(src))
    how = {"method": "openvino.convert_model from model.onnx", "weights": "fp32"}
    if int8 == "weights":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        how = {"method": "openvino.convert_model + nncf.compress_weights (INT8_ASYM, data-free)", "weights": "int8",
               "activations": "fp32"}
    elif int8 == "static":
        import nncf

        items = list(iter(calibration.get_next, None))
        model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        how = {"method": "openvino.convert_model + nncf.quantize (transformer preset)", "weights": "int8",
               "activations": "int8, ranges calibrated", "calibration_rows": calibration.rows}
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return how


def write_folder(out: Path, fmt: str, src: Path, processor, inputs: list[str], outputs: list[str], params: int, how: dict):
    """config.json + processor files + export.json beside the graph: a folder any process loads with runtimes.load."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(src).save_pretrained(out)
    processor.save_pretrained(out)
    atomic_write_json(out / runtimes.EXPORT_RECIPE, {
        "format": fmt, "runtime": RUNTIME[fmt], "file": GRAPH[RUNTIME[fmt]], "inputs": inputs, "outputs": outputs,
        "params": params, "source": str(src), **how, "reload": "pipelines.runtimes.load(folder)"})


def write_generative_folder(out: Path, fmt: str, src: Path, processor, graph: str, inputs: dict, outputs: list[str],
                            params: int, how: dict):
    """The processor's files beside transformers.exporters' folder, and what the stage records under its manifest's
    "pipelines" key (transformers reads only its own keys)."""
    processor.save_pretrained(out)
    manifest = json.loads((out / runtimes.EXPORT_RECIPE).read_text(encoding="utf-8"))
    files = [c["file"] for c in manifest["components"].values()]
    manifest["pipelines"] = {"format": fmt, "runtime": RUNTIME[fmt], "graph": graph, "file": files[0], "files": files,
                             "inputs": inputs, "outputs": outputs, "params": params, "source": str(src), **how,
                             "reload": "pipelines.runtimes.load(folder)  # .generate() as the torch model"}
    atomic_write_json(out / runtimes.EXPORT_RECIPE, manifest)


def export_generative_all(cfg: ExportConfig, ctx: RunContext, src: Path, model, task, processor, sample: dict) -> dict:
    """A generative model's graphs in every format of cfg.formats (GENERATIVE_FORMATS); returns {format: how made}.
    ONNX: exported once to <stage>/onnx, ONNX Runtime's quantize_dynamic per graph for int8. OpenVINO: exported
    once, saved fp32, then NNCF compress_weights (int8, data-free) per graph."""
    outputs, params, made = list(task.export_outputs), modelio.num_parameters(model), {}
    onnx_dir, wanted = ctx.output_dir / "onnx", set(cfg.formats)
    steps = generation_steps(model, sample)  # captured once, traced by each backend
    graphs = {name: list(inputs) for name, (_, inputs) in steps.items()}
    if wanted & {"onnx", "onnx_int8_dynamic"}:
        exported, _ = export_generative(model, steps, "onnx", cfg.opset)
        exported.save_pretrained(onnx_dir)
        made["onnx"] = {"method": "transformers.exporters OnnxExporter: graphs of the steps decompose_for_generation "
                                  f"captures ({', '.join(graphs)}), over a KV cache, opset {cfg.opset}", "weights": "fp32"}
        ctx.log(f"onnx ({task.export_graph}): {modelio.size_on_disk_mb(onnx_dir)} MB, graphs {graphs}")
    if "onnx_int8_dynamic" in wanted:
        out = ctx.output_dir / "onnx_int8_dynamic"
        for graph in graphs:
            made["onnx_int8_dynamic"] = quantize_onnx(onnx_dir / f"{graph}.onnx", out / f"{graph}.onnx", None,
                                                      cfg.per_channel, external_data=True)
        for name in (runtimes.EXPORT_RECIPE, "config.json", "generation_config.json"):
            if (onnx_dir / name).is_file():
                shutil.copy2(onnx_dir / name, out / name)
    if wanted & {"openvino", "openvino_int8"}:
        exported, _ = export_generative(model, steps, "openvino")
        stateful = not model.config.is_encoder_decoder
        how = {"method": f"transformers.exporters OpenVINOExporter (stateful={stateful}): graphs of the steps "
                         f"decompose_for_generation captures ({', '.join(graphs)}), over a KV cache", "weights": "fp32",
               "stateful": stateful}
        if "openvino" in wanted:
            exported.save_pretrained(ctx.output_dir / "openvino")
            made["openvino"] = how
        if "openvino_int8" in wanted:
            import nncf

            for component in exported.components.values():
                component.program = nncf.compress_weights(component.program, mode=nncf.CompressWeightsMode.INT8_ASYM)
            exported.save_pretrained(ctx.output_dir / "openvino_int8")
            made["openvino_int8"] = {**how, "method": how["method"] + " + nncf.compress_weights (INT8_ASYM, data-free)",
                                     "weights": "int8", "activations": "fp32"}
    for fmt in cfg.formats:
        if RUNTIME[fmt] == "openvino":
            made[fmt]["inference_precision"] = cfg.openvino_precision
        write_generative_folder(ctx.output_dir / fmt, fmt, src, processor, task.export_graph, graphs, outputs, params,
                                made[fmt])
        ctx.log(f"{fmt}: {modelio.size_on_disk_mb(ctx.output_dir / fmt)} MB")
    if "onnx" not in wanted and onnx_dir.exists():  # only the source of onnx_int8_dynamic
        shutil.rmtree(onnx_dir)
        made.pop("onnx")
    return made


def export_all(cfg: ExportConfig, ctx: RunContext, src: Path, model, task, processor, splits: dict, train, opts) -> dict:
    """Every format of cfg.formats into <stage>/<format>/; returns {format: how it was made}."""
    sample = dict(modelio.latency_batch(task, processor, model, next(iter(splits.values())), opts, batch_size=2))
    if task.export_graph != "forward":
        return export_generative_all(cfg, ctx, src, model, task, processor, sample)
    onnx_path = ctx.output_dir / "onnx" / GRAPH["onnxruntime"]
    inputs = export_onnx(model, task, sample, onnx_path, cfg.opset)
    outputs, params = list(task.export_outputs), modelio.num_parameters(model)
    made = {"onnx": {"method": f"torch.onnx.export(dynamo=True, opset {cfg.opset})", "weights": "fp32"}}
    ctx.log(f"onnx: {modelio.size_on_disk_mb(onnx_path.parent)} MB, inputs {inputs}")

    def calibration() -> Calibration:  # a seeded sample of the card's train rows, as the task encodes them
        rows = train.shuffle(seed=ctx.seed).select(range(min(len(train), cfg.calibration_samples)))
        return Calibration(task, processor, rows, opts, inputs)

    for fmt in cfg.formats:
        out = ctx.output_dir / fmt
        if fmt == "onnx_int8_dynamic":
            made[fmt] = quantize_onnx(onnx_path, out / GRAPH["onnxruntime"], None, cfg.per_channel)
        elif fmt == "onnx_int8_static":
            made[fmt] = quantize_onnx(onnx_path, out / GRAPH["onnxruntime"], calibration(), cfg.per_channel)
        elif fmt.startswith("openvino"):
            int8 = {"openvino": None, "openvino_int8": "weights", "openvino_int8_static": "static"}[fmt]
            made[fmt] = to_openvino(onnx_path, out / GRAPH["openvino"], int8, calibration() if int8 == "static" else None)
            made[fmt]["inference_precision"] = cfg.openvino_precision
        write_folder(out, fmt, src, processor, inputs, outputs, params, made[fmt])
        ctx.log(f"{fmt}: {modelio.size_on_disk_mb(out)} MB")
    if "onnx" not in cfg.formats:  # only the source of the others
        shutil.rmtree(onnx_path.parent)
        made.pop("onnx")
    return made


# ---------------------------------------------------------------- re-scoring in a fresh process


def rescore_in_fresh_process(ctx: RunContext, job: dict) -> dict:
    """Run `python -m pipelines.stages.export JOB` (see `rescore`): a new interpreter that loads each exported folder
    the way any later process will and scores it beside the torch model; returns its result."""
    import torch

    job_path, result_path = ctx.output_dir / "rescore_job.json", ctx.output_dir / "rescore_result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(job_path, {**job, "threads": torch.get_num_threads(), "result": str(result_path)})
    here = str(Path(__file__).resolve().parents[2])  # the folder this `pipelines` package is imported from
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pipelines.stages.export", str(job_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path})
    if proc.returncode != 0 or not result_path.is_file():
        raise PipelinesError(f"re-scoring the exported models in a fresh process failed (exit {proc.returncode}):\n"
                             + proc.stderr[-3000:])
    return json.loads(result_path.read_text())


def rescore(job: dict) -> dict:
    """In the fresh process: the torch model and every exported folder (pipelines.runtimes.load) scored side by side
    on the same rows with the task's metrics, timed in turns in this process and its threads."""
    import torch

    from pipelines.data import load_card

    torch.set_num_threads(job["threads"])
    src = Path(job["source"])
    model, task = modelio.load_model(src, dtype=torch.float32)
    processor = modelio.load_processor(task, src)
    task.prepare_processor(processor)
    dsd = load_card(job["card"]).load(seed=job["seed"])
    splits = {s: dsd[s].select(range(min(len(dsd[s]), job["max_eval_samples"] or len(dsd[s])))) for s in job["splits"]}
    opts = tasks.EvalOptions(max_length=job["max_length"], generation={}, label_names=job["label_names"])
    entries = [modelio.Entry(fmt, "output", runtimes.load(folder), modelio.load_processor(task, folder), Path(folder),
                             "" if fmt == job["served"] else f"{fmt}_") for fmt, folder in job["folders"].items()]
    entries.sort(key=lambda e: e.label != job["served"])  # the served format's numbers are the stage's own
    entries.append(modelio.Entry("torch", "reference", model, processor, src, "torch_"))
    metrics, per_split, evaluations, lat, first = modelio.side_by_side(
        task, entries, splits, opts, latency_batch_size=job["latency_batch_size"], latency_repeats=job["latency_repeats"])
    return {"metrics": metrics, "per_split": per_split, "evaluations": [e.to_json() for e in evaluations],
            "latency": lat, "outputs": {label: s.outputs for label, s in first.items()},
            "runtimes": {e.label: getattr(e.model, "runtime", "torch") for e in entries}, "pid": os.getpid()}


# ---------------------------------------------------------------- the stage


def gate_all(task, per_split: dict, formats: list[str], max_drop: float | None) -> dict | None:
    """The quality gate on every exported format, the worst first (its numbers are the ones an error names)."""
    if max_drop is None:
        return None
    split = "validation" if "validation" in per_split else next(iter(per_split))
    sign = 1 if task.greater_is_better else -1
    worst = sorted(formats, key=lambda f: sign * per_split[split][f][task.main_metric])
    gates = {f: modelio.quality_gate(task, per_split, ("torch", f), max_drop, "export") for f in worst}
    return {"max_metric_drop": max_drop, "passed": True, "per_format": gates}


def run(cfg: ExportConfig, ctx: RunContext) -> StageResult:
    import torch

    # ---- input model and data
    src = modelio.input_model_dir(ctx, cfg.model_path, "export")
    if modelio.read_recipe(src) is not None or runtimes.read_export(src) is not None:
        raise PipelinesError(f"{src} is already quantized or exported; export a full-precision torch model")
    model, task = modelio.load_model(src, dtype=torch.float32)
    if problem := export_problem(task, cfg.formats):
        raise PipelinesError(problem)
    processor = modelio.load_processor(task, src)
    task.prepare_processor(processor)
    dsd = ctx.data.load(seed=ctx.seed)
    label_names = task.check_data(ctx.data, dsd)
    splits = {s: dsd[s] for s in cfg.eval_splits if s in dsd}
    if not splits:
        raise PipelinesError(f"the data card has none of the eval splits {cfg.eval_splits} (has {list(dsd)})")
    if cfg.max_eval_samples:
        splits = {s: d.select(range(min(len(d), cfg.max_eval_samples))) for s, d in splits.items()}
    opts = tasks.EvalOptions(max_length=cfg.max_length, generation={}, label_names=label_names)
    train = dsd.get("train", next(iter(dsd.values())))

    # ---- export every format, then score them all in a fresh process beside the torch model
    made = export_all(cfg, ctx, src, model, task, processor, splits, train, opts)
    folders = {fmt: str(ctx.output_dir / fmt) for fmt in cfg.formats}
    got = rescore_in_fresh_process(ctx, {
        "source": str(src), "card": str(ctx.data.path), "seed": ctx.seed, "splits": list(splits),
        "max_eval_samples": cfg.max_eval_samples, "max_length": cfg.max_length, "label_names": label_names,
        "folders": folders, "served": cfg.served, "latency_batch_size": cfg.latency_batch_size,
        "latency_repeats": cfg.latency_repeats})
    metrics, per_split, lat = got["metrics"], got["per_split"], got["latency"]
    evaluations = [Evaluation(**e) for e in got["evaluations"]] + baselines(task, train, splits, opts, processor)
    atomic_write_json(ctx.output_dir / "predictions.json", {"split": next(iter(splits)), "task": task.name,
                                                            "outputs": got["outputs"]})
    gate = gate_all(task, per_split, cfg.formats, cfg.max_metric_drop)

    # ---- what each format kept, and what it costs
    split0, main = next(iter(splits)), task.main_metric
    torch_mb = modelio.size_on_disk_mb(src)
    for fmt in cfg.formats:
        pre = "" if fmt == cfg.served else f"{fmt}_"
        mb = modelio.size_on_disk_mb(folders[fmt])
        metrics.update({f"{pre}mb": mb, f"{pre}size_ratio": round(torch_mb / mb, 3), f"{pre}ms": lat[fmt]["median_ms"],
                        f"{pre}speedup": round(lat["torch"]["median_ms"] / lat[fmt]["median_ms"], 3),
                        f"{fmt}_{main}_delta": per_split[split0]["delta"].get(main) if fmt == cfg.served else
                        round(per_split[split0][fmt][main] - per_split[split0]["torch"][main], 6)})
    metrics.update(torch_mb=torch_mb, torch_ms=lat["torch"]["median_ms"], params=modelio.num_parameters(model))
    return StageResult(
        metrics=metrics,
        outputs={"model": cfg.served, **{fmt: fmt for fmt in cfg.formats}},
        task=task.name,
        evaluations=evaluations,
        info={
            "task": task.name, "source": str(src), "formats": made, "served": cfg.served,
            "runtimes": got["runtimes"], "rescore_pid": got["pid"], "reload": "pipelines.runtimes.load(folder)", "eval": per_split,
            "rescored": "in a fresh process (python -m pipelines.stages.export), every folder loaded with its runtime",
            "latency": {**lat, "batch_size": cfg.latency_batch_size, "split": split0, "threads": modelio.threads(),
                        "repeats": cfg.latency_repeats,
                        "what": "median ms of one forward pass, torch and every runtime timed in turns in one process"},
            "baselines": task.baseline_notes(),
            "quality_gate": gate,
        },
    )


def baselines(task, train, splits: dict, opts, processor) -> list[Evaluation]:
    return [Evaluation(name, "baseline", split, m)
            for split, raw in splits.items() for name, m in task.baselines(train, raw, opts, processor).items()]


def export_problem(task, formats: list[str]) -> str:
    """Why the task's models are not exported in these formats ("" when they are)."""
    other = [f for f in formats if f not in GENERATIVE_FORMATS]
    if task.export_graph != "forward" and other:
        return (f"formats {other}: a {task.name} model is exported as graphs over a KV cache, written as "
                f"{list(GENERATIVE_FORMATS)} only")
    return ""


def plan(cfg: ExportConfig, inputs: dict, recipe_dir: Path, card):
    """The input model's task (an earlier stage's, or the local folder's config.json), formats it is not written as
    refused, and the card checked against it. The exported folders hold the same task."""
    name, problems = modelio.planned_task(inputs, "model", cfg.model_path, "model_path", recipe_dir)
    if name:
        task = tasks.get(name)
        if problem := export_problem(task, cfg.formats):
            problems.append(problem)
        elif card is not None:
            problems += task.data_problems(card.roles, card.label_names, card.path)
    return name, problems


STAGE = StageDef(
    name="export",
    Config=ExportConfig,
    run=run,
    version="1",
    inputs={"model": "optional"},
    data="required",
    distributed=False,
    plan=plan,
    description="Export a model to ONNX (ONNX Runtime fp32 / int8) and OpenVINO IR, re-scored in a fresh process.",
)


if __name__ == "__main__":  # the fresh process of rescore_in_fresh_process
    _job = json.loads(Path(sys.argv[1]).read_text())
    atomic_write_json(Path(_job["result"]), rescore(_job))
