"""Convert a timm ResNet-50 and a CIFAR ResNet-110, check the dense outputs, print their MAC tables.

python examples/convert_demo.py
"""

import timm
import torch

import dynroute


def main() -> None:
    torch.manual_seed(0)
    for name, model, input_size in (
        ("timm resnet50", timm.create_model("resnet50"), (3, 224, 224)),
        ("CIFAR resnet110", dynroute.models.resnet110(), (3, 32, 32)),
    ):
        model.eval()
        images = torch.randn(4, *input_size)
        with torch.no_grad():
            dense_logits = model(images)
            dynroute.convert_resnet(model, input_size=input_size)
            dynroute.force_gates(model, "open")
            open_logits = model(images)
            dynroute.force_gates(model, None)
            model(images)
        paths = dynroute.routing_paths(model)
        table = dynroute.macs_table(model)
        print(f"== {name}: {table.num_blocks} gated blocks")
        print(table)
        print(f"max |logits(gates open) - logits(original)| = {(open_logits - dense_logits).abs().max():.2e}")
        print(f"eval paths of 4 random images use {dynroute.macs_fraction(paths, table):.1%} of dense MACs\n")


if __name__ == "__main__":
    main()
