"""Build tiny pipelines (Stable Diffusion and FIBO architectures) with seeded random weights.

Tests, demos and the embedded default need a text-to-image model that is small, fast on a CPU
and available offline. This module assembles one from configs: a UNet2DConditionModel, an
AutoencoderKL (scale factor 8, like SD), a CLIP text encoder and a DDIM scheduler, about 1.1M
parameters in all, and writes it with `save_pretrained` in the diffusers folder layout. The
services then load it through the same `DiffusionPipeline.from_pretrained` path as real SD 1.5
weights. The tokenizer is the real CLIP BPE tokenizer, rebuilt from the vocabulary file that
open_clip ships, so prompts tokenize exactly as they would for SD 1.5.

`tiny-fibo` is a `BriaFiboPipeline` built the same way (see `build_tiny_fibo`): FIBO's DiT, its
Wan 2.2-style VAE and a SmolLM3 text encoder, each a few layers wide, about 1.7M parameters.

The same seed gives the same weight files, byte for byte.

    python -m services.generator.tiny_models --out .data/models [--seed 0] [--force]
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.model_build import build_command, staged_folder
from services.common.torch_compat import prepare_torch

prepare_torch()

import open_clip.tokenizer as open_clip_tokenizer  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLWan,
    BriaFiboPipeline,
    BriaFiboTransformer2DModel,
    ControlNetModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

TINY_SD_NAME = "tiny-sd"
# The ControlNets built for tiny-sd, each in its own folder (`tiny-sd-controlnet-canny`).
TINY_SD_CONTROLNETS = ("canny", "depth")
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Width of the text encoder's hidden states, which the UNet attends to.
_TEXT_WIDTH = 16
# The BPE file starts with a header line; CLIP uses the next 49152 - 256 - 2 merges.
_MERGE_COUNT = 49152 - 256 - 2

TINY_FIBO_NAME = "tiny-fibo"
# SmolLM3's vocabulary size and special tokens (Llama 3's ids). BriaFiboPipeline encodes an empty
# prompt as the bare token 128000 itself, so the embedding must reach that far.
SMOLLM3_VOCAB_SIZE = 128256
FIBO_BOS = ("<|begin_of_text|>", 128000)
FIBO_EOS = ("<|end_of_text|>", 128001)
FIBO_PAD = ("<|finetune_right_pad_id|>", 128004)
# BriaFiboPipeline's longest prompt, in tokens.
FIBO_MAX_TOKENS = 3000
# tiny-fibo's widths: text hidden states, latent channels (the VAE's z_dim, the DiT's input).
_FIBO_TEXT_WIDTH = 8
_FIBO_LATENT_CHANNELS = 8


def build_tiny_sd(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir/tiny-sd`, replacing what is there; return that folder.

    The folder is assembled next to its final place and moved in when complete, so a reader
    never sees half a model.
    """
    with staged_folder(out_dir, TINY_SD_NAME) as staging:
        vocab, merges = clip_bpe_vocab()
        tokenizer_dir = staging / "tokenizer"
        write_clip_bpe_files(tokenizer_dir, vocab, merges)
        tokenizer = CLIPTokenizer(
            vocab=vocab,
            # Annotated as list[str]; the tokenizers BPE model underneath takes pairs.
            merges=merges,  # type: ignore[arg-type]
            model_max_length=CLIP_CONTEXT_LENGTH,
        )
        pipeline = _assemble_pipeline(tokenizer, seed)
        pipeline.save_pretrained(str(staging), safe_serialization=True)
    return out_dir / TINY_SD_NAME


def tiny_controlnet_name(kind: str) -> str:
    return f"{TINY_SD_NAME}-controlnet-{kind}"


def build_tiny_controlnet(out_dir: Path, kind: str, seed: int = 0) -> Path:
    """Write a ControlNet for tiny-sd's UNet to `out_dir/tiny-sd-controlnet-<kind>`; return it.

    It is made the way real ControlNets start: `ControlNetModel.from_unet` copies the encoder of
    the tiny-sd UNet in `out_dir` (built first). A fresh ControlNet's output convolutions are
    zeros, so it would change nothing; here they get seeded random weights instead (a different
    stream per kind), so that each kind steers the image, and differently. The layers the control
    image enters through are scaled so that its content still shows at the output: a different
    control image gives a different render.
    """
    if kind not in TINY_SD_CONTROLNETS:
        raise ValueError(f"kind must be one of {TINY_SD_CONTROLNETS}, not {kind!r}")
    unet = UNet2DConditionModel.from_pretrained(  # type: ignore[no-untyped-call]
        str(out_dir / TINY_SD_NAME), subfolder="unet", local_files_only=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * len(TINY_SD_CONTROLNETS) + TINY_SD_CONTROLNETS.index(kind))
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=(8, 16, 16, 16),  # x8, like the VAE
        )
        embedding = controlnet.controlnet_cond_embedding
        zero_convs = [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            embedding.conv_out,
        ]
        with torch.no_grad():
            for conv in (embedding.conv_in, *embedding.blocks):
                _randomize(conv, gain=2.0)  # keeps the signal's size through SiLU
            for conv in zero_convs:
                _randomize(conv, gain=1.0)
    name = tiny_controlnet_name(kind)
    with staged_folder(out_dir, name) as staging:
        controlnet.save_pretrained(str(staging), safe_serialization=True)
    return out_dir / name


def _randomize(conv: torch.nn.Conv2d, gain: float) -> None:
    """Normal weights of spread gain / sqrt(fan-in), no bias: what the layer adds depends on
    its input (a constant bias would steer every render alike)."""
    torch.nn.init.normal_(conv.weight, std=gain / math.sqrt(conv.weight[0].numel()))
    if conv.bias is not None:
        torch.nn.init.zeros_(conv.bias)


def _controlnet_builder(kind: str) -> Callable[[Path, int], Path]:
    return lambda out_dir, seed: build_tiny_controlnet(out_dir, kind, seed)


def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (token -> id) and merge list, from the file open_clip ships.

    The vocabulary is built the way open_clip's SimpleTokenizer builds it: the 256 byte
    characters, the same characters ending a word (`</w>`), one token per merge, then the
    start and end markers, which get ids 49406 and 49407.
    """
    bpe_file = Path(open_clip_tokenizer.default_bpe())
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : 1 + _MERGE_COUNT]:
        first, second = line.split()
        merges.append((first, second))
    byte_chars = list(open_clip_tokenizer.bytes_to_unicode().values())
    tokens = [
        *byte_chars,
        *(char + "</w>" for char in byte_chars),
        *(first + second for first, second in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP BPE vocabulary has {len(vocab)} tokens, not {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_bpe_files(
    folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]
) -> None:
    """Write the vocabulary as `vocab.json` + `merges.txt`, the files SD 1.5's tokenizer has."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{first} {second}\n" for first, second in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")


# Type checkers see diffusers' top-level names as its placeholder classes (the real ones are
# imported lazily), so the diffusers objects here are untyped.
def _assemble_pipeline(tokenizer: CLIPTokenizer, seed: int) -> Any:
    # Module constructors draw their initial weights from the global CPU generator; fork it
    # so the build is reproducible and leaves the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                hidden_size=_TEXT_WIDTH,
                intermediate_size=2 * _TEXT_WIDTH,
                num_attention_heads=2,
                num_hidden_layers=2,
                projection_dim=_TEXT_WIDTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=32,  # x8 from the VAE: 256x256 by default
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(  # type: ignore[no-untyped-call]
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),  # four blocks: scale factor 8
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=256,
        )
    # SD 1.5's noise schedule. DDIM rather than PNDM because it is the faster of the two
    # schedulers that run without deprecation warnings on numpy 2.
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_fibo(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny FIBO pipeline to `out_dir/tiny-fibo`, replacing what is there; return it.

    Same architecture as FIBO, scaled down: a `BriaFiboTransformer2DModel` (one dual-stream and
    one single-stream block), an `AutoencoderKLWan` laid out like Wan 2.2's (patch size 2 and
    three upsamplings: 16 pixels per latent cell, the factor the pipeline assumes), a
    two-layer `SmolLM3ForCausalLM` whose last two hidden states condition the DiT, and a
    flow-matching Euler scheduler with resolution-dependent shift. Sizes must be multiples of
    16. The tokenizer is byte-level with no merges, so any string, any JSON prompt, tokenizes.
    """
    with staged_folder(out_dir, TINY_FIBO_NAME) as staging:
        # diffusers' placeholder class to a type checker (see _assemble_pipeline): untyped.
        pipeline: Any = BriaFiboPipeline(
            **_fibo_models(seed),
            tokenizer=byte_level_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(  # type: ignore[no-untyped-call]
                num_train_timesteps=1000,
                use_dynamic_shifting=True,  # the pipeline passes `mu` for the image size
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        )
        pipeline.save_pretrained(str(staging), safe_serialization=True)
    return out_dir / TINY_FIBO_NAME


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (GPT-2's byte alphabet) plus SmolLM3's special tokens
    at their real ids; every prompt starts with the begin-of-text token, as an empty one does
    in BriaFiboPipeline."""
    vocab = {char: i for i, char in enumerate(open_clip_tokenizer.bytes_to_unicode().values())}
    vocab.update(dict((FIBO_BOS, FIBO_EOS, FIBO_PAD)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True) for t, _ in (FIBO_BOS, FIBO_EOS, FIBO_PAD)]
    )
    bos = FIBO_BOS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[FIBO_BOS]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=FIBO_BOS[0],
        eos_token=FIBO_EOS[0],
        pad_token=FIBO_PAD[0],
        model_max_length=FIBO_MAX_TOKENS,
    )


def _fibo_models(seed: int) -> dict[str, Any]:
    """The weighted parts of tiny-fibo, drawn from a forked generator seeded `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = SmolLM3ForCausalLM(
            SmolLM3Config(
                vocab_size=SMOLLM3_VOCAB_SIZE,
                hidden_size=_FIBO_TEXT_WIDTH,
                intermediate_size=2 * _FIBO_TEXT_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=4096,
                bos_token_id=FIBO_BOS[1],
                eos_token_id=FIBO_EOS[1],
                pad_token_id=FIBO_PAD[1],
            )
        )
        transformer = BriaFiboTransformer2DModel(  # type: ignore[no-untyped-call]
            patch_size=1,
            in_channels=_FIBO_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            # The pipeline feeds the last two hidden states side by side, and each layer's
            # hidden states to one block.
            joint_attention_dim=2 * _FIBO_TEXT_WIDTH,
            text_encoder_dim=_FIBO_TEXT_WIDTH,
            axes_dims_rope=[2, 2, 4],  # sums to attention_head_dim
        )
        vae = AutoencoderKLWan(  # type: ignore[no-untyped-call]
            base_dim=8,
            z_dim=_FIBO_LATENT_CHANNELS,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,  # RGB in 2x2 patches
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.0] * _FIBO_LATENT_CHANNELS,
            latents_std=[1.0] * _FIBO_LATENT_CHANNELS,
        )
    return {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}


def main(argv: list[str] | None = None) -> None:
    build_command(
        argv,
        "tiny Stable Diffusion pipeline",
        TINY_SD_NAME,
        "model_index.json",
        build_tiny_sd,
    )
    for kind in TINY_SD_CONTROLNETS:
        build_command(
            argv,
            f"tiny-sd {kind} ControlNet",
            tiny_controlnet_name(kind),
            "diffusion_pytorch_model.safetensors",
            _controlnet_builder(kind),
        )
    build_command(argv, "tiny FIBO pipeline", TINY_FIBO_NAME, "model_index.json", build_tiny_fibo)


if __name__ == "__main__":
    main()
