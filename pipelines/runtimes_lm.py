"""A causal LM exported as one ONNX decode graph over a KV cache (transformers.exporters), behind the torch
model's own `generate()`: greedy, sampling, beam search, streamers and stopping criteria are transformers'
generation loop, unchanged; only the forward pass runs in ONNX Runtime. What optimum's ORTModelForCausalLM does,
on transformers' own exporter (optimum-onnx needs transformers < 4.58).

The graph is the "multi-token decode" of `transformers.exporters.utils.decompose_for_generation`: input_ids,
attention_mask and position_ids of any length, plus a DynamicCache of any length, zero included; out come the
logits and the grown cache. So one graph is both the prefill (an empty cache) and every decoding step.

    from pipelines import runtimes
    model = runtimes.load("runs/x/export/onnx")          # a folder the export stage wrote for a causal LM
    model.generate(**tok(["Once upon"], return_tensors="pt"), max_new_tokens=20)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel


class RuntimeCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' ExportedModel (its ONNX Runtime runner) as a model generate() drives. A PreTrainedModel
    without parameters: generate() reads the hooks and attributes a PreTrainedModel has; forward is the graph."""

    main_input_name = "input_ids"
    base_model_prefix = "exported"
    _is_stateful = False

    def __init__(self, folder, recipe: dict):
        import onnxruntime as ort
        from transformers.exporters import ExportedModel

        folder = Path(folder)
        super().__init__(AutoConfig.from_pretrained(folder))
        opts = ort.SessionOptions()  # ONNX Runtime sizes its pool from every core, not torch's (the process's) share
        opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
        self.exported = ExportedModel.from_pretrained(folder, device="cpu", session_options=opts)
        self.runner = self.exported.runners["model"]
        self.folder, self.recipe, self.runtime = folder, recipe, recipe["runtime"]
        gen = folder / "generation_config.json"
        self.generation_config = (GenerationConfig.from_pretrained(folder) if gen.is_file()
                                  else GenerationConfig.from_model_config(self.config))
        text = self.config.get_text_config(decoder=True)
        self._kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self._head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._layers = text.num_hidden_layers

    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float32)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def parameter_count(self) -> int:
        """The parameters of the model it was exported from (an int8 graph holds the same weights, in 8 bits)."""
        return int(self.recipe["params"])

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
        if cache is None or cache.get_seq_length() == 0:
            cache = self.empty_cache(batch)
        past = cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past, past + length).unsqueeze(0).expand(batch, -1)
        return self.runner(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                           cache=cache)

    def __repr__(self) -> str:
        return f"<{self.runtime} causal LM {self.folder}>"
