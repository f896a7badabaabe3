"""Cases for sobel_boundary_loss: DIN's boundary loss on (8, 4, 224, 224) predictions (scales 1, 2, 4),
against a one-hot float target and against int64 labels (one-hot on the fly), and the DIN setting
(logits, labels, softmax fused); against the eager reference and its torch.compile. Memory-bound: the rate
column is the minimum traffic (read pred and target; with backward also write d loss / d pred) over the
time, against the machine's copy bandwidth."""
import torch
import torch.nn.functional as F

from .. import reference, sobel_boundary_loss
from ..testing import make_tensor
from .harness import Candidate, Case, compiled


def cases(device: str, dtype: torch.dtype, quick: bool):
    shape = (2, 4, 224, 224) if quick else (8, 4, 224, 224)
    fused = "triton" if device.startswith("cuda") else "cpu"
    out = []
    for target_kind, from_logits in (("one-hot", False), ("labels", False), ("labels", True)):
        def make(target_kind=target_kind, from_logits=from_logits):
            low, high = (-3.0, 3.0) if from_logits else (0.0, 1.0)
            pred = make_tensor(shape, dtype, device, requires_grad=True, low=low, high=high)
            labels = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
            target = labels if target_kind == "labels" else F.one_hot(labels, shape[1]).permute(0, 3, 1, 2).to(dtype)
            return {"pred": pred, "target": target}

        def run(backend, from_logits=from_logits):
            return lambda pred, target: sobel_boundary_loss(pred, target, from_logits=from_logits, backend=backend)

        def oracle(pred, target, from_logits=from_logits):
            return reference.sobel_boundary_loss(pred, target, from_logits=from_logits)

        pred_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        labels_bytes = torch.Size(shape).numel() // shape[1] * 8  # int64 [B, H, W]
        target_bytes = pred_bytes if target_kind == "one-hot" else labels_bytes
        out.append(Case(
            op="sobel_boundary_loss",
            shape=f"{tuple(shape)} {target_kind}{' logits' if from_logits else ''}",
            make_inputs=make,
            candidates=[Candidate("reference (eager)", run("reference"), "reference"),
                        Candidate("torch.compile(reference)", compiled(oracle), "builtin"),
                        Candidate(f"medattn {fused}", run(fused))],
            reference64=oracle, forward_bytes=pred_bytes + target_bytes, bytes=2 * pred_bytes + target_bytes))
    return out
