"""Residual-stream statistics per layer: mean L2 norm, std and variance over dims and
non-first positions (position 0 reported apart), and the largest |activation| with its
position, dim and token.

These are the raw numbers behind "The Curse of Depth in Large Language Models" (Sun et
al., 2025) and "Massive Activations in Large Language Models" (Sun et al., 2024).
"""

from __future__ import annotations

import pandas as pd
import torch

from layerscope.analysis.metric import Metric, NoOptions, Tables
from layerscope.analysis.plots import quoted_tokens
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.reducers import MomentsResult, ResidualMoments
from layerscope.probes.zoo import LoadedModel

PROBE = ProbeSpec(reducers=(ResidualMoments(kinds=("resid_pre", "resid_mid", "resid_post")),))


@torch.no_grad()
def residual_stats(capture: Capture, decode=None) -> pd.DataFrame:
    """One row per (point, layer): `mean_norm`, `std`, `variance` (non-first positions),
    `mean_norm_first` and `std_first` (position 0), and `max_abs` with `max_window`,
    `max_position`, `max_dim` and `max_token` (text when `decode` is given)."""
    result: MomentsResult = capture["moments"]
    rows = []
    for kind, stats in result.kinds.items():
        rest, first = stats.rest, stats.first
        mean_norm, std, variance = rest.mean_norm, rest.std, rest.variance
        mean_norm_first, std_first = first.mean_norm, first.std
        for layer in range(capture.n_layers):
            window, pos, dim, token = stats.max_at.at(layer)
            rows.append({
                "point": kind,
                "layer": layer,
                "mean_norm": mean_norm[layer].item(),
                "std": std[layer].item(),
                "variance": variance[layer].item(),
                "mean_norm_first": mean_norm_first[layer].item(),
                "std_first": std_first[layer].item(),
                "max_abs": stats.max_abs[layer].item(),
                "max_window": window,
                "max_position": pos,
                "max_dim": dim,
                "max_token": decode([token]) if decode else token,
            })
    return pd.DataFrame(rows)


def tables(captured: Capture, loaded: LoadedModel, options: NoOptions) -> Tables:
    return {"residual_stats": residual_stats(captured, decode=loaded.tokenizer.decode)}


def _figures(tables: Tables) -> list:
    from layerscope.analysis.plots import residual_stats_figure

    return [residual_stats_figure(tables["residual_stats"])]


def _summarize(tables: Tables) -> list[str]:
    post = tables["residual_stats"].query("point == 'resid_post'").set_index("layer")
    jump = (post["max_abs"] / post["max_abs"].shift(1)).idxmax()
    return [f"residual-stats: max|x| jumps {post.loc[jump - 1, 'max_abs']:.4g} -> {post.loc[jump, 'max_abs']:.4g} "
            f"at block {jump} (dim {post.loc[jump, 'max_dim']}, position {post.loc[jump, 'max_position']}); "
            f"mean norm {post['mean_norm'].iloc[0]:.4g} -> {post['mean_norm'].iloc[-1]:.4g} from first to last block"]


def _block_outputs(tables: Tables) -> Tables:
    table = tables["residual_stats"]
    shown = table[table["point"] == "resid_post"].drop(columns=["point", "max_window"])
    return {"residual_stats (resid_post, block outputs; --format json for resid_pre/mid)": quoted_tokens(shown)}


METRIC = Metric("residual-stats", "per-layer mean norm, std, variance and max|x| of the residual stream",
                probe=lambda options, loaded: PROBE, tables=tables, figures=_figures, summarize=_summarize, display=_block_outputs)
