"""Explain an image's visual tokens with an off-the-shelf VLM and a contextual bank.

    python quickstart.py --image photo.jpg
    python quickstart.py --image photo.jpg --layers 2,8,27 --html --json
    python quickstart.py --image photo.jpg --model Qwen/Qwen2.5-VL-7B-Instruct --build-bank captions.txt

A thin wrapper over `latentlens explain-image` (same options; see `--help`). Defaults
reproduce the original quickstart: Qwen2-VL-7B-Instruct, the public Qwen2-VL bank (only the
needed layers are downloaded), centre crop + Lanczos resize to 448 → 16×16 = 256 visual
tokens, query layers 2, 8, 27, every bank layer searched, 10 patches sampled once with
seed 10, top-5. Writes ``<image-stem>_latentlens.png`` next to the image (or --out).
"""

from latentlens.cli_explain import explain_image_command

if __name__ == "__main__":
    explain_image_command(prog_name="quickstart.py")
