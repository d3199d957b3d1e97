"""Point-cloud Transformer (Point-BERT, Yu et al. 2022; Point-MAE, Pang et al. 2022): a cloud is
cut into local patches (farthest-point-sampled centres and their nearest neighbours), a small
shared PointNet (Qi et al. 2017) turns each patch into a token, an MLP of the centre's
coordinates is its position, and a class token plus a bidirectional encoder stack classify it.

Invariance: the tokens are a function of the set of points, not of their order. Farthest-point
sampling starts from the point farthest from the centroid and the neighbour sets are pooled
with a max, so permuting a cloud's points leaves the output unchanged (up to exact distance
ties, where `argmax`/`topk` take the lower index). The groups keep the order in which they were
sampled; the stack gets no index positions (model.positional.kind must be `none`): where a
token sits comes from its centre alone. Rotations are not built in: the model learns them
from rotated training data. Coordinates are used as given (the data pipeline centres clouds
and scales them into the unit sphere).

Legend: `b` batch, `P` points, `G` groups, `K` points per group, `c` point-network width, `d` width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..nn.positional import PositionalEncoding
from .common import Stack
from .encoder_classifier import EncoderClassifier
from .parts import Parts
from .point_groups import check_points, group_points
from .registry import ARCHITECTURES, moved_section


@dataclass
class PointCloudOptions:
    """`model.options` of arch `point_cloud`: clouds of `num_points` xyz points become
    `num_groups` tokens, each the PointNet encoding (per-point MLP of `widths`, max-pooled) of
    the `group_size` nearest neighbours of a farthest-point-sampled centre, plus an MLP (hidden
    width `position_hidden`) of the centre."""

    num_points: int = 1024
    num_groups: int = 64
    group_size: int = 32
    widths: list[int] = field(default_factory=lambda: [64, 128])
    position_hidden: int = 128

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when the sizes do not fit together, or the rest of `cfg` does not
        fit a point-cloud model."""
        if min(self.num_points, self.num_groups, self.group_size, self.position_hidden) < 1 or not self.widths or min(self.widths) < 1:
            raise ConfigError(
                f"model.options: num_points, num_groups, group_size, position_hidden and every width must be at least 1 "
                f"(got num_points={self.num_points}, num_groups={self.num_groups}, group_size={self.group_size}, "
                f"position_hidden={self.position_hidden}, widths={self.widths})"
            )
        for name in ("num_groups", "group_size"):
            if getattr(self, name) > self.num_points:
                raise ConfigError(
                    f"model.options.{name}={getattr(self, name)} exceeds model.options.num_points={self.num_points}: a cloud "
                    f"of {self.num_points} points cannot give that many; lower {name} or raise num_points"
                )
        if cfg.positional.kind != "none":
            raise ConfigError(
                f"model.arch=point_cloud takes token positions from the group centres' coordinates, not from indices; got "
                f"model.positional.kind={cfg.positional.kind!r}. Set model.positional.kind=none"
            )
        if cfg.head.kind not in HEAD_KINDS:
            raise ConfigError(f"model.arch=point_cloud supports model.head.kind {', '.join(HEAD_KINDS)}; got {cfg.head.kind!r}")


moved_section("point_cloud", "points")

HEAD_KINDS = ("none", "sequence_classification", "embedding")


class PointNet(nn.Module):
    """A shared PointNet over each group: per-point MLP through `widths` (Linear, GELU; from the
    second layer on Linear, LayerNorm, GELU), max-pool over the group, and a second per-point
    MLP on each point's feature joined with that pooled feature (Point-MAE's two-stage
    mini-PointNet), max-pooled to width `dim`: (b, G, K, 3) -> (b, G, d).

    The first layer has no norm: a LayerNorm right after a linear map of the coordinates would
    divide out their scale (LN(W(ax)) = LN(Wx)), and with it how far the points lie from the
    centre. LayerNorm instead of PointNet's BatchNorm keeps every cloud independent of its batch."""

    def __init__(self, widths: list[int], dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(3, widths[0]), nn.GELU()]
        for prev, w in zip(widths, widths[1:]):
            layers += [nn.Linear(prev, w), nn.LayerNorm(w), nn.GELU()]
        self.first = nn.Sequential(*layers)
        c = 2 * widths[-1]
        self.second = nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c), nn.GELU(), nn.Linear(c, dim))

    def forward(self, groups: Tensor) -> Tensor:  # (b, G, K, 3) -> (b, G, d)
        f = self.first(groups)  # (b, G, K, c)
        pooled = f.max(2, keepdim=True).values.expand_as(f)  # (b, G, K, c)
        return self.second(torch.cat([f, pooled], -1)).max(2).values  # (b, G, d)

    def reset_extra_parameters(self) -> None:
        """PyTorch's fan-in initialisation (uniform weights and biases) for the point MLPs, in
        place of the model-wide N(0, 0.02): coordinates of size ~0.1 need weights of size ~1,
        and nonzero biases make the first layers respond to the points' distance, not only
        their direction."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()


class PointGroupEmbedding(nn.Module):
    """Tokens of a cloud: group it (`group_points`), embed each group with the PointNet, add an
    MLP of the centre coordinates, prepend a learned class token."""

    def __init__(self, points: PointCloudOptions, dim: int, *, dropout: float) -> None:
        super().__init__()
        self.num_groups, self.group_size = points.num_groups, points.group_size
        self.pointnet = PointNet(points.widths, dim)
        self.position = nn.Sequential(nn.Linear(3, points.position_hidden), nn.GELU(), nn.Linear(points.position_hidden, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.dropout = nn.Dropout(dropout)

    def reset_extra_parameters(self) -> None:
        """The centre MLP takes coordinates in the unit sphere: PyTorch's fan-in initialisation."""
        for mod in self.position.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (b, P, 3) -> tokens (b, 1 + G, d) and the group centres (b, G, 3)."""
        need = max(self.num_groups, self.group_size)
        check_points(points, need, f"the model (model.options.num_groups={self.num_groups}, group_size={self.group_size})")
        with torch.autocast(points.device.type, enabled=False):
            centres, groups = group_points(points.float(), self.num_groups, self.group_size)  # (b, G, 3), (b, G, K, 3)
        x = self.pointnet(groups) + self.position(centres)  # (b, G, d)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (b, 1 + G, d)
        return self.dropout(x), centres


class PointCloudTransformer(EncoderClassifier):
    """Point groups -> bidirectional encoder blocks -> final norm -> head: points (b, P, 3) in,
    the head's output (class logits (b, num_labels) with head sequence_classification) out,
    final states (b, 1 + G, d), the class token first, from `hidden`."""

    def __init__(
        self, config: ModelConfig, embed: PointGroupEmbedding, positional: PositionalEncoding, stack: Stack, head: nn.Module
    ) -> None:
        # named `embed` so that Muon leaves the point network to AdamW, as it does token embeddings
        super().__init__(config, "embed", embed, positional, stack, head)

    def tokens(self, points: Tensor) -> tuple[Tensor, Tensor]:
        x, _ = self.embed(points)
        return x, torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (b, 1 + G) positions, unused by 'none'

    def classify(self, hidden: Tensor) -> Tensor:
        return self.head(hidden, None)

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random clouds of the configured points in the unit ball."""
        o: PointCloudOptions = self.config.arch_options
        points = torch.randn(batch, o.num_points, 3, generator=generator)
        points = points / points.norm(dim=-1, keepdim=True).clamp_min(1e-6) * torch.rand(batch, o.num_points, 1, generator=generator)
        return (points.to(self.input_device()),)

    def tokens_per_input(self) -> int:
        return self.config.arch_options.num_groups + 1

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (model summary) for `seq_len` tokens, the class token and
        seq_len - 1 groups: each group runs the shared PointNet once per point of the group and
        the centre MLP once; every token runs the stack's weights (per block application) and
        the mixing its attention kind declares over all tokens; the head runs once per cloud. Finding the
        groups (distances of every point to the centres) multiplies no weights and is left out."""
        from .builders import count_parameters as count
        from .summary import mixing_per_token

        stack = self.stack
        groups = max(0, seq_len - 1)
        embed = groups * (2 * self.embed.group_size * count(self.embed.pointnet) + 2 * count(self.embed.position))
        calls = stack.block_calls()
        blocks = 2 * count(stack) * calls / max(1, len(stack.blocks)) + (mixing_per_token(self, seq_len) or 0.0)
        return (embed + 2 * count(self.head)) / seq_len + blocks


@ARCHITECTURES.register("point_cloud", options=PointCloudOptions)
def build_point_cloud(cfg: ModelConfig, parts: Parts) -> PointCloudTransformer:
    """A point-cloud Transformer with the configured head (the sequence-classification head
    pools the class token, or the mean of all tokens with head.pooling=mean)."""
    return PointCloudTransformer(
        cfg,
        PointGroupEmbedding(cfg.arch_options, cfg.dim, dropout=cfg.dropout),
        parts.positional(causal=False),
        parts.stack(cfg.num_layers, causal=False, name="encoder"),
        parts.head(None),  # type: ignore[arg-type]  # these heads need no token embedding
    )
