"""Generative models exported as ONNX / OpenVINO graphs over a KV cache (transformers.exporters), behind the torch model's
own `generate()`: greedy, sampling, beam search, streamers and stopping criteria are transformers' generation
loop, unchanged; only the forward passes run in ONNX Runtime or OpenVINO. What optimum's ORTModelForCausalLM /
ORTModelForSeq2SeqLM do, on transformers' own exporter (optimum-onnx needs transformers < 4.58).

A causal LM (export.json "graph": "decode") is one graph, the "multi-token decode" of
`transformers.exporters.utils.decompose_for_generation`: input_ids, attention_mask and position_ids of any length,
plus a DynamicCache of any length, zero included; out come the logits and the grown cache. So one graph is both
the prefill (an empty cache) and every decoding step. An encoder-decoder ("graph": "encoder-decoder") is three:
the encoder, the decoder's prefill (which fills the cross-attention cache) and its decode step.

    from pipelines import runtimes
    model = runtimes.load("runs/x/export/onnx")          # a folder the export stage wrote for a causal LM
    model.generate(**tok(["Once upon"], return_tensors="pt"), max_new_tokens=20)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, DynamicCache, EncoderDecoderCache, GenerationConfig, GenerationMixin,
                          PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast
from transformers.utils import ModelOutput


class RuntimeGenerative(PreTrainedModel, GenerationMixin):
    """transformers' ExportedModel (its ONNX Runtime or OpenVINO runners, one per graph) as a model generate() drives. A
    PreTrainedModel without parameters: generate() reads the hooks and attributes a PreTrainedModel has; forward
    runs the graphs."""

    main_input_name = "input_ids"
    base_model_prefix = ""  # no inner torch model: base_model is the model itself

    def __init__(self, folder, recipe: dict):
        from transformers.exporters import ExportedModel

        folder = Path(folder)
        super().__init__(AutoConfig.from_pretrained(folder))
        threads = torch.get_num_threads()  # the runtimes size their pools from every core, not the process's share
        if recipe["runtime"] == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            runner = {"device": "cpu", "session_options": opts}
        else:  # OpenVINO: its CPU default runs what is not int8 in bf16 where the CPU has it; export.json says which
            runner = {"device": "cpu", "config": {"INFERENCE_NUM_THREADS": threads,
                                 "INFERENCE_PRECISION_HINT": recipe.get("inference_precision", "f32")}}
        self.exported = ExportedModel.from_pretrained(folder, **runner)
        self.runners = self.exported.runners
        self.folder, self.recipe, self.runtime = folder, recipe, recipe["runtime"]
        gen = folder / "generation_config.json"
        self.generation_config = (GenerationConfig.from_pretrained(folder) if gen.is_file()
                                  else GenerationConfig.from_model_config(self.config))
        # the graphs take a DynamicCache of any length (a static / hybrid cache would hand them 4D masks)
        self.generation_config.cache_implementation, self.generation_config.use_cache = "dynamic", True

    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float32)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def run(self, graph: str, **inputs):
        """One graph on keyword inputs (tensors, a cache, encoder outputs): what the torch forward returns. OpenVINO
        copies its inputs in: read in place, a cache tensor it returned the step before is memory its next request
        writes (a decoding loop of 4+ steps crashed on freed memory)."""
        return self.runners[graph](share_inputs=self.runtime != "openvino", **inputs)

    def parameter_count(self) -> int:
        """The parameters of the model it was exported from (an int8 graph holds the same weights, in 8 bits)."""
        return int(self.recipe["params"])

    def __repr__(self) -> str:
        return f"<{self.runtime} {self.recipe['graph']} graphs {self.folder}>"


class OpenVINOState:
    """The cache of a stateful OpenVINO decoder as generate() holds it: the keys and values stay inside the infer
    request (its variables, read through a fused gather by `beam_idx`); this records how many positions they hold and
    which rows the next step reads (beam search's reorder_cache), as optimum-intel's OVModelForCausalLM does."""

    is_compileable = is_croppable = False

    def __init__(self):
        self.length, self.beam_idx = 0, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.beam_idx = beam_idx


class RuntimeCausalLM(RuntimeGenerative):
    """A decoder: graph `model`, the multi-token decode step over a DynamicCache (prefill = an empty cache). An
    OpenVINO graph exported stateful (its inputs end in `beam_idx`) keeps the cache inside its infer request instead
    of copying it in and out at every step."""

    def __init__(self, folder, recipe: dict):
        super().__init__(folder, recipe)
        text = self.config.get_text_config(decoder=True)
        self._kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self._head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._layers = text.num_hidden_layers
        runner = self.runners["model"]
        self.stateful = self.runtime == "openvino" and "beam_idx" in {
            name for port in runner.compiled_model.inputs for name in port.get_names()}
        self._owner = None  # the OpenVINOState whose keys and values the infer request holds

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if not self.stateful:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is not None and not isinstance(model_kwargs["cache"], OpenVINOState):
            raise ValueError("a stateful OpenVINO model keeps its cache inside the compiled model: generate() takes "
                             "no `cache` for it")
        model_kwargs.setdefault("cache", OpenVINOState())

    def empty_cache(self, batch: int) -> DynamicCache:
        """A cache of length 0 in every layer: the graph's cache inputs exist at every call, prefill included."""
        cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        for layer in range(self._layers):
            nothing = torch.zeros(batch, self._kv_heads, 0, self._head_dim)
            cache.update(nothing, nothing, layer)
        return cache

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **_ignored):
        """The graph on one chunk of tokens after what `cache` holds. Without position_ids the positions follow
        the cache (as the torch model's own default); generate() passes them from the attention mask."""
        batch, length = input_ids.shape
        if self.stateful:
            return self.stateful_forward(input_ids, attention_mask, position_ids, cache)
        if cache is None or cache.get_seq_length() == 0:
            cache = self.empty_cache(batch)
        past = cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past, past + length).unsqueeze(0).expand(batch, -1)
        return self.run("model", input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                        cache=cache)

    def stateful_forward(self, input_ids, attention_mask, position_ids, state) -> CausalLMOutputWithPast:
        """The stateful graph on one chunk of tokens: an empty (or no) state starts a sequence (the request's
        variables reset), a state the request no longer holds is refused (its keys and values are gone)."""
        from transformers.exporters.runners.runner_openvino import openvino_output_tensor

        batch, length = input_ids.shape
        state = state if isinstance(state, OpenVINOState) else OpenVINOState()
        runner = self.runners["model"]
        if state.length == 0:
            runner.request.reset_state()
            self._owner = state
        elif self._owner is not state:
            raise RuntimeError("this stateful OpenVINO model has run another sequence since this cache was made: its "
                               "keys and values are gone (one generation at a time per loaded model)")
        past = state.length
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past, past + length).unsqueeze(0).expand(batch, -1)
        beams = torch.arange(batch) if state.beam_idx is None else state.beam_idx
        feed = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "position_ids": position_ids,
                "beam_idx": beams.int()}
        out = runner.request.infer({k: v.contiguous().numpy() for k, v in feed.items()})
        state.length, state.beam_idx = past + length, None
        port = runner.compiled_model.output("logits")
        logits = openvino_output_tensor(out[port], port)
        return CausalLMOutputWithPast(logits=logits, cache=state)


class _Encoder(torch.nn.Module):
    """The `encoder` graph as the module generate() asks get_encoder() for (it runs it once per batch)."""

    main_input_name = "input_ids"

    def __init__(self, model: RuntimeGenerative):
        super().__init__()
        self.run = model.run  # a bound method, not the model: no module cycle

    def forward(self, input_ids=None, attention_mask=None, **_ignored) -> BaseModelOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # generate() makes none
        return self.run("encoder", input_ids=input_ids, attention_mask=mask.long())


class RuntimeSeq2SeqLM(RuntimeGenerative):
    """An encoder-decoder: graphs `encoder`; `prefill`, the decoder's first tokens on an empty cache (it computes
    the cross-attention keys and values); `decode`, any number of decoder tokens over a filled EncoderDecoderCache."""

    def __init__(self, folder, recipe: dict):
        super().__init__(folder, recipe)
        self.encoder = _Encoder(self)

    def get_encoder(self, *_args, **_kwargs):
        return self.encoder

    def prepare_decoder_input_ids_from_labels(self, labels):
        """The labels shifted right behind decoder_start_token_id (-100 as padding), as the torch model makes them
        (DataCollatorForSeq2Seq calls this: a teacher-forced batch)."""
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, cache=None,
                labels=None, **_ignored):
        """generate() passes the encoder's outputs; a plain call (teacher-forced scoring) runs the encoder first."""
        if decoder_input_ids is None and labels is not None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if attention_mask is None:  # all of the source (generate() passes none when the caller gave none)
            attention_mask = (torch.ones_like(input_ids) if encoder_outputs is None else
                              torch.ones(encoder_outputs[0].shape[:2], dtype=torch.long))
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        elif not isinstance(encoder_outputs, ModelOutput):  # a tuple: (last_hidden_state, ...)
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        step = dict(attention_mask=attention_mask.long(), decoder_input_ids=decoder_input_ids,
                    encoder_outputs=encoder_outputs)
        if cache is None or cache.get_seq_length() == 0:
            return self.run("prefill", **step, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
        return self.run("decode", **step, cache=cache)
