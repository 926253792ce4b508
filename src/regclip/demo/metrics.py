r"""The proxy reward (optimized) and the gold metrics (never optimized).

* proxy: the proxy classifier's logit margin ``z_c - max_{k != c} z_k`` for the conditioned
  class c. Unbounded and computed by a full-resolution CNN trained on clean images only, so
  it can be raised by contrast beyond the data range and by high-frequency patterns.
* gold_acc: accuracy of an independent classifier (different architecture, held-out split,
  sees only the 8x8 average-pooled, clamped image) on the conditioned class.
* nn_dist: RMS pixel distance from each sample to the nearest real digit of its class
  (realism / staying on the data manifold); lower is better.
* diversity: mean pairwise RMS distance between samples of the same class; higher is better.
* drift: mean squared difference between the fine-tuned and pretrained velocity fields
  along the fine-tuned model's ODE trajectories.
* kl: sum over steps of the per-dimension KL between the two models' Flow-SDE transition
  Gaussians on the same states, ``mean_D (mu - mu_ref)^2 / (2 s_t^2)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import FlowSDE
from .data import Digits
from .nets import GoldClassifier, ProxyClassifier, VelocityNet
from .rollout import ode_sample

__all__ = ["GOLD_METRICS", "evaluate", "proxy_reward"]

GOLD_METRICS: tuple[str, ...] = ("gold_acc", "nn_dist", "diversity", "drift", "kl")


@torch.no_grad()
def proxy_reward(proxy: ProxyClassifier, images: Tensor, labels: Tensor) -> Tensor:
    """(B,) logit margin of the conditioned class."""
    logits = proxy(images)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return own - others


def _rms(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) RMS distance between rows of (N, D) and (M, D)."""
    return torch.cdist(a, b) / a.shape[1] ** 0.5


@torch.no_grad()
def nearest_real_distance(images: Tensor, labels: Tensor, digits: Digits) -> Tensor:
    """(B,) RMS distance to the nearest real digit of the sample's own class."""
    out = torch.empty(len(labels), device=images.device)
    flat = images.flatten(1)
    for label in labels.unique().tolist():
        sel = labels == label
        real = digits.of_class(label).to(images.device).flatten(1)
        out[sel] = _rms(flat[sel], real).amin(dim=1)
    return out


@torch.no_grad()
def within_class_diversity(images: Tensor, labels: Tensor) -> float:
    """Mean over classes of the mean pairwise RMS distance among that class's samples."""
    flat, values = images.flatten(1), []
    for label in labels.unique().tolist():
        group = flat[labels == label]
        n = len(group)
        if n > 1:
            values.append(float(_rms(group, group).sum() / (n * (n - 1))))
    return sum(values) / max(len(values), 1)


@torch.no_grad()
def evaluate(
    net: VelocityNet,
    reference: VelocityNet,
    proxy: ProxyClassifier,
    gold: GoldClassifier,
    digits: Digits,
    times: Tensor,
    labels: Tensor,
    noise: Tensor,
    kernel: FlowSDE,
) -> tuple[dict[str, float], Tensor]:
    """Proxy and gold metrics of deterministic ODE samples from fixed ``noise``.

    Returns the metrics and the images (B, 1, H, W).
    """
    images, states = ode_sample(net, times, labels, noise)
    drift, kl = 0.0, 0.0
    for k, x in enumerate(states):
        t = times[k].to(x.device).expand(len(labels))
        dt = (times[k + 1] - times[k]).to(x.device).expand(len(labels))
        v, v_ref = net(x, t, labels), reference(x, t, labels)
        mean, std = kernel.evaluate(x, v, t, dt)
        ref_mean, _ = kernel.evaluate(x, v_ref, t, dt)
        drift += float(((v - v_ref) ** 2).mean()) / len(states)
        kl += float((((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)).mean())
    metrics = {
        "proxy": float(proxy_reward(proxy, images, labels).mean()),
        "gold_acc": float((gold(images).argmax(1) == labels).float().mean()),
        "nn_dist": float(nearest_real_distance(images, labels, digits).mean()),
        "diversity": within_class_diversity(images, labels),
        "drift": drift,
        "kl": kl,
    }
    return metrics, images
