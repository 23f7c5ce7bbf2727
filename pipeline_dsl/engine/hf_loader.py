"""Hugging Face folder -> LlamaConfig + float32 weights in the engine's naming.

A folder with config.json (a llama-family `model_type`: llama, mistral, qwen2, qwen3, phi3, smollm, and
Gemma 3's text model: gemma3_text, or gemma3's text_config), one
or more *.safetensors files and tokenizer.json (read by tokenizer.py). Names are mapped to the engine's:

    model.embed_tokens.weight                    -> embed
    model.norm.weight                            -> norm
    lm_head.weight                               -> lm_head (absent when tied)
    model.layers.N.input_layernorm.weight        -> layers.N.attn_norm
    model.layers.N.self_attn.{q,k,v,o}_proj      -> layers.N.{q,k,v,o}
    model.layers.N.self_attn.{q,k,v}_proj.bias   -> layers.N.{q,k,v}_bias (Qwen2)
    model.layers.N.self_attn.{q,k}_norm          -> layers.N.{q,k}_norm (Qwen3)
    model.layers.N.post_attention_layernorm      -> layers.N.ffn_norm
    model.layers.N.mlp.{gate,up,down}_proj       -> layers.N.{gate,up,down}
    model.layers.N.self_attn.qkv_proj            -> layers.N.{q,k,v}    (Phi-3: split, engine/phi3.py)
    model.layers.N.mlp.gate_up_proj              -> layers.N.{gate,up}  (Phi-3: split)

Gemma 3 (model_files/gemma.py): its post_attention_layernorm -> layers.N.post_attn_norm,
pre_feedforward_layernorm -> layers.N.ffn_norm, post_feedforward_layernorm -> layers.N.post_ffw_norm,
and every norm weight w becomes 1 + w (its RMSNorm computes x * (1 + w), in float32 as here: exact).

A folder whose config.json has a quantization_config (AWQ's "gemm" checkpoints, GPTQ's of 4 or 8
bits, compressed-tensors' pack-quantized: model_files/quantized.py) holds qweight, qzeros, scales (and
g_idx), or weight_packed, weight_scale, ..., for each quantized linear layer: each is dequantized to
the float32 weight, and where its 4-bit groups fit the engine's int4 blocks also kept as those
(`weights.int4`, as a GGUF's Q4 blocks are: engine/hf_quant.py).

HF checkpoints keep the "rotate half" Q/K layout the model uses, so nothing is permuted.
config.json and the header of every *.safetensors file are checked first
(`pipeline_dsl.model_files`): a malformed config, a missing or corrupt weights file or a
tensor whose shape does not fit the config is an `HFModelError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline_dsl.model_files import ModelFileProblem, hf_engine_name, hf_llama_config, weight_files
from pipeline_dsl.model_files.hf import hf_quant_config
from pipeline_dsl.model_files.quantized import quant_parts

from .model import LlamaConfig
from .quant import Weights


class HFModelError(ModelFileProblem):
    """The folder is not a llama-family safetensors checkpoint this engine can run."""


@dataclass(frozen=True)
class HFModel:
    config: LlamaConfig
    weights: dict          # engine name -> float32 torch.Tensor (a Weights: .int4 as well)


def load_hf_folder(folder: str | Path) -> HFModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = LlamaConfig(**hf_llama_config(folder))  # config.json + every safetensors header
        spec = hf_quant_config(folder)
    except ModelFileProblem as e:
        raise HFModelError(e.path, e.problem) from None
    weights, quantized = Weights(), {}
    for f in weight_files(folder):
        try:
            tensors = load_file(str(f))
        except SafetensorError as e:
            raise HFModelError(f, f"cannot read the weights ({e})") from e
        for name, t in tensors.items():
            parts = quant_parts(name)
            layer = None if parts is None else hf_engine_name(parts[0] + ".weight", config.gemma)
            if layer is not None:                        # engine name -> (the module, its tensors, its file)
                quantized.setdefault(layer, (parts[0], {}, f))[1][parts[1]] = t
                continue
            mapped = hf_engine_name(name, config.gemma)
            if mapped is not None:
                weights[mapped] = t.float() + 1.0 if config.gemma and mapped.endswith("norm") else t.float()
    if quantized:
        from .hf_quant import dequantize

        for layer, (module, parts, f) in quantized.items():
            try:
                weights[layer], blocks = dequantize(spec, parts, module)
            except ValueError as e:
                raise HFModelError(f, str(e)) from None
            if blocks is not None:
                weights.int4[layer] = blocks
    if config.fused:                                     # Phi-3: q/k/v and gate/up split (engine/phi3.py)
        from .phi3 import split_fused
        split_fused(config, weights)
    return HFModel(config=config, weights=weights)
