"""Build a tiny Stable-Diffusion-architecture pipeline with seeded random weights.

Tests, demos and the embedded default need a text-to-image model that is small, fast on a CPU
and available offline. This module assembles one from configs: a UNet2DConditionModel, an
AutoencoderKL (scale factor 8, like SD), a CLIP text encoder and a DDIM scheduler, about 1.1M
parameters in all, and writes it with `save_pretrained` in the diffusers folder layout. The
services then load it through the same `DiffusionPipeline.from_pretrained` path as real SD 1.5
weights. The tokenizer is the real CLIP BPE tokenizer, rebuilt from the vocabulary file that
open_clip ships, so prompts tokenize exactly as they would for SD 1.5.

The same seed gives the same weight files, byte for byte.

    python -m services.generator.tiny_models --out .data/models [--seed 0] [--force]
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from services.common.model_build import build_command, staged_folder
from services.common.torch_compat import prepare_torch

prepare_torch()

import open_clip.tokenizer as open_clip_tokenizer  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

TINY_SD_NAME = "tiny-sd"
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Width of the text encoder's hidden states, which the UNet attends to.
_TEXT_WIDTH = 16
# The BPE file starts with a header line; CLIP uses the next 49152 - 256 - 2 merges.
_MERGE_COUNT = 49152 - 256 - 2


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


def main(argv: list[str] | None = None) -> None:
    build_command(
        argv,
        "tiny Stable Diffusion pipeline",
        TINY_SD_NAME,
        "model_index.json",
        build_tiny_sd,
    )


if __name__ == "__main__":
    main()
