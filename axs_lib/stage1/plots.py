"""Pictures of a run, refreshed at each validation: the loss curves and sample predictions.

``plots/loss.png`` shows training loss and validation loss against the step. ``samples/step_<N>.png``
shows, for a few fixed validation tiles, the SAR VV input, the predicted RGB (B4, B3, B2) and the
true RGB. Plotting never touches the random generators, so it cannot change a run's bits.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

RGB = (2, 1, 0)  # B4, B3, B2 in the optical tensor (B2, B3, B4, B8)
RGB_GAIN = 3.0  # reflectance is dark; brighten for display


def _rgb(optical: torch.Tensor) -> torch.Tensor:
    return (optical[list(RGB)] * RGB_GAIN).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def loss_curves(path: Path, records: list[dict]) -> None:
    """Plot training and validation loss from ``metrics.jsonl`` records."""
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (L1 + SSIM term)")
    ax.set_title("Stage 1: SAR to optical")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_panel(path: Path, model: torch.nn.Module, dataset, device: torch.device, count: int) -> None:
    """SAR VV, predicted RGB and true RGB for the first ``count`` tiles of ``dataset``."""
    count = min(count, len(dataset))
    fig, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    model.eval()
    with torch.no_grad():
        for row in range(count):
            sample = dataset[row]
            pred = model(sample["sar"][None].to(device))[0]
            panels = [(sample["sar"][0].cpu().numpy(), "SAR VV", "gray"), (_rgb(pred), "predicted RGB", None),
                      (_rgb(sample["optical"]), "true RGB", None)]
            for ax, (image, title, cmap) in zip(axes[row], panels):
                ax.imshow(image, cmap=cmap)
                ax.set_title(title)
                ax.axis("off")
    model.train()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def refresh(output_dir: Path, records: list[dict], model, dataset, device, step: int, count: int) -> None:
    """Rewrite ``plots/loss.png`` and write ``samples/step_<step>.png``."""
    (output_dir / "plots").mkdir(exist_ok=True)
    (output_dir / "samples").mkdir(exist_ok=True)
    loss_curves(output_dir / "plots" / "loss.png", records)
    sample_panel(output_dir / "samples" / f"step_{step}.png", model, dataset, device, count)
