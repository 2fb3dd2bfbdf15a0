"""``fusionsearch inspect-model NAME``: parameter counts and output shapes of a registered model."""

from __future__ import annotations

import argparse

HELP = "print a model's parameter counts (encoder / decoder / total) and its output shapes for one dummy input"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name (pvt_emcad, timm_unet, small_unet, dynunet, ...)")
    parser.add_argument("--classes", type=int, default=9, help="number of classes, background included (default 9)")
    parser.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--size", type=int, default=224, help="side of the dummy input (default 224)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D image or 3D volume input (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the dummy input (default 1)")
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. --set encoder=pvt_v2_b0 --set num_outputs=3 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from fusionsearch.errors import ConfigError, FusionSearchError
    from fusionsearch.models import build_model, model_options, parameter_counts
    from fusionsearch.overrides import parse_set_arguments

    for flag, value in (("--classes", args.classes), ("--size", args.size), ("--batch", args.batch)):
        if value < 1:
            raise ConfigError(f"must be a positive integer, got {value}", field=flag)
    options = parse_set_arguments(args.options)
    accepted = model_options(args.name)
    if "spatial_dims" not in options and (accepted is None or "spatial_dims" in accepted) and args.dims == 3:
        options["spatial_dims"] = 3
    model = build_model(args.name, num_classes=args.classes, in_channels=args.in_channels, **options)
    if model.spatial_dims is not None and model.spatial_dims != args.dims:
        raise FusionSearchError(
            f"Model '{args.name}' is {model.spatial_dims}D but --dims {args.dims} was asked; use --dims "
            f"{model.spatial_dims}."
        )
    counts = parameter_counts(model)
    shape = (args.batch, args.in_channels, *([args.size] * args.dims))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        outputs = model(torch.randn(shape, generator=generator))

    shown = ", ".join(f"{key}={value}" for key, value in options.items())
    print(f"model {args.name}" + (f" ({shown})" if shown else ""))
    print(f"classes {args.classes}, input channels {args.in_channels}, outputs {len(outputs)}")
    print("parameters:")
    for part in ("encoder", "decoder", "total"):
        count = counts[part]
        text = "n/a" if count is None else f"{count:,}  ({count / 1e6:.2f}M)"
        print(f"  {part:<8} {text}")
    print(f"input  {list(shape)}")
    print("outputs (coarsest first):")
    for index, logits in enumerate(outputs):
        ratios = sorted({args.size / side for side in logits.shape[2:]})
        scale = " x ".join(f"1/{ratio:g}" for ratio in ratios)
        print(f"  P{index}  {list(logits.shape)}  ({'full size' if ratios == [1] else scale + ' of the input'})")
    return 0
