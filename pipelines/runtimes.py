"""Exported model folders (what the export stage writes) loaded with their runtime, ONNX Runtime or OpenVINO,
behind the same call as the torch model they came from: `model(**batch).logits` is a torch tensor, `model.config`
is the folder's config.json. So a task's `evaluate` and `serve_batch` take one unchanged, as optimum's
ORTModelFor... / OVModelFor... classes are drop-ins for a transformers model.

    from pipelines import runtimes
    model = runtimes.load("runs/x/export/onnx_int8_dynamic")        # any folder with an export.json
    tok = AutoTokenizer.from_pretrained("runs/x/export/onnx_int8_dynamic")
    model(**tok(["a fine film"], return_tensors="pt")).logits

A folder holds config.json, the processor's files, the graph (`model.onnx`, or `openvino_model.xml` + `.bin`,
optimum's file names) and `export.json`: runtime, graph file, input and output names, how it was made.

A generative model's folder is transformers.exporters' own (`ExportedModel.save_pretrained`: per graph
<graph>.onnx + <graph>.onnx.data, or openvino_<graph>.xml + .bin; its export.json manifest,
generation_config.json), with what the export stage records under the manifest's "pipelines" key; it loads as a
pipelines.runtimes_lm model, which generate() drives.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.errors import PipelinesError

EXPORT_RECIPE = "export.json"  # beside config.json in every folder the export stage writes
RUNTIMES = ("onnxruntime", "openvino")


def read_export(folder) -> dict | None:
    """What the export stage recorded about the folder (None: not an exported folder). For a transformers.exporters
    folder, the manifest's "pipelines" entry, with the whole manifest under "manifest"."""
    p = Path(folder) / EXPORT_RECIPE
    if not p.is_file():
        return None
    got = json.loads(p.read_text(encoding="utf-8"))
    if "components" in got:  # transformers.exporters' manifest
        return {**got["pipelines"], "manifest": got} if "pipelines" in got else None
    return got


class RuntimeModel:
    """One exported graph in its runtime, called like the torch model: keyword tensors in (those the graph takes;
    extra ones such as labels are ignored), a ModelOutput of torch tensors out, named as the graph's outputs.
    Runs on the CPU with torch's thread count (`torch.get_num_threads()` when loaded)."""

    def __init__(self, folder, recipe: dict):
        import torch
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.recipe = recipe
        self.runtime = recipe["runtime"]
        self.config = AutoConfig.from_pretrained(self.folder)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        graph, threads = self.folder / recipe["file"], torch.get_num_threads()
        if not graph.is_file():
            raise PipelinesError(f"{self.folder}/{EXPORT_RECIPE} names {recipe['file']}, which is not in the folder")
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in session.get_inputs()]
            self.output_names = [o.name for o in session.get_outputs()]
            self._run = lambda feed: session.run(self.output_names, feed)
        elif self.runtime == "openvino":
            import openvino as ov

            # OpenVINO's CPU default runs non-int8 ops in bf16 where the CPU has it; export.json says which precision
            precision = recipe.get("inference_precision", "f32")
            compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                   "INFERENCE_PRECISION_HINT": precision})
            self.input_names = [i.get_any_name() for i in compiled.inputs]
            self.output_names = [o.get_any_name() for o in compiled.outputs]
            self._run = lambda feed: [r for r in compiled(feed).values()]
        else:
            raise PipelinesError(f"{self.folder}/{EXPORT_RECIPE}: unknown runtime {self.runtime!r} (expected one of {RUNTIMES})")

    def __call__(self, **inputs):
        import numpy as np
        import torch
        from transformers.utils import ModelOutput

        missing = [n for n in self.input_names if inputs.get(n) is None]
        if missing:
            raise PipelinesError(f"{self.folder}: the exported graph takes {self.input_names}; missing {missing}")
        feed = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        return ModelOutput({n: torch.from_numpy(np.asarray(v)) for n, v in zip(self.output_names, self._run(feed))})

    forward = __call__

    def eval(self):
        return self

    def parameter_count(self) -> int:
        """The parameters of the model it was exported from (int8 graphs hold the same weights, in 8 bits)."""
        return int(self.recipe["params"])

    def __repr__(self) -> str:
        return f"<{self.runtime} model {self.folder}>"


def load(folder):
    """THE way to load what the export stage wrote, in any process: a RuntimeModel, or for the graphs of a
    generative model (a causal LM's, an encoder-decoder's) a RuntimeCausalLM / RuntimeSeq2SeqLM."""
    folder = Path(folder)
    recipe = read_export(folder)
    if recipe is None:
        raise PipelinesError(f"{folder} has no {EXPORT_RECIPE} written by the export stage: not a folder it wrote")
    if recipe.get("graph") in ("decode", "encoder-decoder"):
        from pipelines.runtimes_lm import RuntimeCausalLM, RuntimeSeq2SeqLM

        return (RuntimeCausalLM if recipe["graph"] == "decode" else RuntimeSeq2SeqLM)(folder, recipe)
    return RuntimeModel(folder, recipe)
