"""engine.bench --cache fbcache:T|taylorseer:N|static:STEPS: each engine config with the step cache, measured first
without it in the same process (the cache paused: the reference of its fidelity and its overhead), beside diffusers'
pipeline with diffusers' own hook of the same rule and parameters (FirstBlockCacheConfig, TaylorSeerCacheConfig in
lite mode; a static schedule has none: diffusers runs uncached then). Per row: the steps run fully and skipped,
seconds per image against the uncached config and against diffusers' cached pipeline, PSNR / SSIM / latent error
against the uncached config."""

from __future__ import annotations

from ..stepcache import StepCacheConfig, parse_step_cache


def prepare_cache(text: str | None) -> StepCacheConfig | None:
    return parse_step_cache(text) if text else None


def enable_diffusers_cache(pipe, cache: StepCacheConfig) -> str | None:
    """diffusers' own hook for the rule on its pipeline (its label), or None where diffusers has none (static)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.mode == "fbcache":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache.threshold))
    elif cache.mode == "taylorseer":
        import torch

        dtype = torch.bfloat16 if cache.factors_dtype == "bf16" else torch.float32
        pipe.transformer.enable_cache(
            TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=cache.warmup,
                                  disable_cache_after_step=cache.stop_after, max_order=cache.order,
                                  taylor_factors_dtype=dtype, use_lite_mode=True)
        )  # fmt: skip
    else:
        return None
    return cache.label


def note_cache(row, engine, uncached_row, uncached_output, output, baseline_row) -> None:
    """The row's step-cache figures (see the module docstring), into row.step_cache."""
    from ..measure import psnr, relative_error, ssim

    decisions = engine.step_cache_state.last_call().get("cond", [])
    figures = {
        "cache": engine.step_cache_state.config.label,
        "full_steps": decisions.count(True),
        "skipped_steps": decisions.count(False),
    }
    if uncached_row is not None and not uncached_row.error:
        figures.update(
            uncached_ms_per_step=uncached_row.ms_per_step,
            uncached_total_s=uncached_row.total_s,
            speedup_vs_uncached=uncached_row.total_s / row.total_s,
            # with nothing skipped (fbcache at 0), what the cache itself costs a step
            full_step_overhead=row.ms_per_step / uncached_row.ms_per_step if not decisions.count(False) else None,
        )
    if uncached_output is not None and output is not None:
        figures.update(
            psnr_vs_uncached_db=psnr(output.images, uncached_output.images),
            ssim_vs_uncached=ssim(output.images, uncached_output.images),
            latent_err_vs_uncached=relative_error(output.latents, uncached_output.latents),
        )
    if baseline_row is not None and not baseline_row.error:
        # a cached step's time says little (skipped steps are near zero): the speed-up is per image here
        row.speedup = baseline_row.total_s / row.total_s
    row.step_cache = figures
