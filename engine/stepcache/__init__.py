"""Step caching: denoising steps that reuse the transformer's work of earlier steps instead of running it.

    EngineConfig(step_cache=StepCacheConfig("taylorseer", interval=5))   # or the preset fp8-compile-fastacc-taylorseer

Three rules, each deciding the same steps as diffusers' own hooks with the same parameters (engine/stepcache/hooks.py):
- 'fbcache' (First-Block Cache, diffusers' FirstBlockCacheConfig): every step runs the first double block; when its
  image residual changed by at most `threshold` (mean |r - r_prev| / mean |r_prev|, r_prev of the last full step)
  the other 56 blocks are skipped and their residual of the last full step is added instead. One host sync per step
  (the comparison), none of diffusers' graph breaks: the decision sits between compiled regions; under CUDA graphs
  the blocks after the second replay as one graph on full steps (graphs.py).
- 'taylorseer' (TaylorSeer, diffusers' TaylorSeerCacheConfig(use_lite_mode=True)): full steps for the first
  `warmup` steps, then one every `interval`; the steps between get the transformer's output extrapolated from the
  last full steps by a Taylor series of `order` (divided differences). No sync; the skipped steps run nothing, so it
  composes with whole-forward CUDA graphs.
- 'static': the full steps listed in `steps`, the others extrapolated as TaylorSeer does (`order` 0: the last full
  step's output reused).

`EngineConfig.cache` is the compile cache (CacheConfig, older than this); hence `step_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

MODES = ("off", "fbcache", "taylorseer", "static")
FACTOR_DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class StepCacheConfig:
    """mode: 'off' | 'fbcache' | 'taylorseer' | 'static' (module docstring).

    threshold: fbcache's relative-L1 threshold on the first block's residual, in [0, 1] (ParaAttention: 0.08 ~1.55x,
        0.12 ~1.9x on FLUX.1-dev); 0 never skips.
    interval, warmup, stop_after: taylorseer's full step every `interval` steps after `warmup` full steps (diffusers'
        cache_interval, disable_cache_before_step, disable_cache_after_step: every step from `stop_after` on is full).
    order: the Taylor series' order for the skipped steps of taylorseer and static (0: reuse, 1, 2).
    steps: static's full steps (0-based denoising step indices; must include 0).
    factors_dtype: the dtype the Taylor factors are kept in: 'bf16' (diffusers' default) or 'fp32'.
    """

    mode: str = "off"
    threshold: float = 0.08
    interval: int = 5
    warmup: int = 3
    stop_after: int | None = None
    order: int = 1
    steps: tuple[int, ...] | None = None
    factors_dtype: str = "bf16"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"step_cache.mode={self.mode!r} is not one of {', '.join(map(repr, MODES))}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ConfigError(f"step_cache.threshold={self.threshold!r} must be a number in [0, 1] (e.g. 0.08)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"step_cache.threshold={self.threshold} is outside [0, 1]: it bounds the relative change of the first "
                "block's residual (0.08 skips ~1/3 of FLUX.1-dev's steps, 0.12 about half; 0 never skips)"
            )
        for name, least in (("interval", 1), ("warmup", 1), ("order", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"step_cache.{name}={value!r} must be an integer >= {least}")
        if self.order > 2:
            raise ConfigError(f"step_cache.order={self.order} must be 0, 1 or 2 (higher orders extrapolate noise)")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 0):
            raise ConfigError(f"step_cache.stop_after={self.stop_after!r} must be None or a step index >= 0")
        if self.factors_dtype not in FACTOR_DTYPES:
            raise ConfigError(f"step_cache.factors_dtype={self.factors_dtype!r} must be 'bf16' or 'fp32'")
        if self.mode == "static":
            self._check_steps()
        elif self.steps is not None:
            raise ConfigError(f"step_cache.steps is for mode 'static'; mode {self.mode!r} decides its own steps")

    def _check_steps(self) -> None:
        steps = self.steps
        if not isinstance(steps, tuple) or not steps or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ConfigError(
                f"step_cache.steps={steps!r}: static needs a tuple of the full steps' indices (>= 0), e.g. "
                "(0, 1, 2, 4, 9, 14, 19, 24)"
            )
        if list(steps) != sorted(set(steps)):
            raise ConfigError(f"step_cache.steps={steps!r} must be increasing, each step once")
        if steps[0] != 0:
            raise ConfigError(f"step_cache.steps={steps!r} must start with 0: a skipped step needs a full one before")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def label(self) -> str:
        if self.mode == "off":
            return ""
        if self.mode == "fbcache":
            return f"fbcache:{self.threshold:g}"
        if self.mode == "taylorseer":
            return f"taylorseer:{self.interval}" + (f",order={self.order}" if self.order != 1 else "")
        return f"static:{','.join(map(str, self.steps))}" + (f",order={self.order}" if self.order != 1 else "")

    def full_steps(self, total: int) -> list[int]:
        """The steps that run the transformer fully in a call of `total` steps (fbcache: decided at run time, so
        every step is listed as a candidate)."""
        if self.mode in ("off", "fbcache"):
            return list(range(total))
        if self.mode == "static":
            return [step for step in self.steps if step < total]
        return [step for step in range(total) if taylorseer_computes(self, step)]

    def check_steps_exist(self, total: int, why: str = "") -> None:
        """A static schedule naming steps past the call's last one: refused (InputError) before the call runs.
        `total`: the steps the call runs (`why`: what made them fewer than num_inference_steps)."""
        from ..errors import InputError

        if self.mode == "static" and self.steps[-1] >= total:
            past = [step for step in self.steps if step >= total]
            raise InputError(
                f"step_cache.steps names step(s) {past} but the call runs {total} steps{why} (0..{total - 1}); drop "
                f"them or raise num_inference_steps" + (" or strength" if why else "")
            )


def check_step_cache_fits(config) -> None:
    """What a step cache cannot be combined with in an EngineConfig, refused when the config is made."""
    cache = config.step_cache
    if not cache.enabled:
        return
    if cache.mode == "fbcache" and config.offload.streams:
        raise ConfigError(
            f"step_cache fbcache skips blocks that offload.policy={config.offload.policy!r} streams in order; use "
            "offload.policy 'none' or 'model', or step_cache taylorseer / static"
        )
    if config.parallel.enabled:
        raise ConfigError(
            "step_cache with a parallel config is not supported yet (every rank must make the same decisions); "
            "leave step_cache off under parallel, or run the cached config on one GPU"
        )


def with_step_cache(config, cache: StepCacheConfig):
    """An EngineConfig with `cache`, named '<config>+<cache>' (under CUDA graphs, fbcache captures the blocks after
    the second one instead of the whole forward, which cannot branch after a block)."""
    from dataclasses import replace

    return replace(config, step_cache=cache, name=f"{config.label}+{cache.label}")


def taylorseer_computes(config: StepCacheConfig, step: int) -> bool:
    """diffusers' TaylorSeerCacheHook._measure_should_compute for step index `step` (0-based)."""
    warm = step < config.warmup
    due = (step - config.warmup - 1) % config.interval == 0
    cooled = config.stop_after is not None and step >= config.stop_after
    return warm or due or cooled


def parse_step_cache(text: str) -> StepCacheConfig:
    """'fbcache:0.08' | 'taylorseer:5' | 'taylorseer:5:2' (interval, order) | 'static:0,1,2,4,9,14,19,24' |
    'static:0,1,2,4,9,14,19,24:0' (steps, order) | 'off' -> StepCacheConfig (engine.bench --cache)."""
    mode, _, rest = text.partition(":")
    fields = rest.split(":") if rest else []
    usage = "use fbcache:THRESHOLD, taylorseer:INTERVAL[:ORDER] or static:STEP,STEP,...[:ORDER] (e.g. taylorseer:5)"
    try:
        if mode == "off" and not fields:
            return StepCacheConfig()
        if mode == "fbcache" and len(fields) == 1:
            return StepCacheConfig("fbcache", threshold=float(fields[0]))
        if mode == "taylorseer" and 1 <= len(fields) <= 2:
            order = int(fields[1]) if len(fields) == 2 else 1
            return StepCacheConfig("taylorseer", interval=int(fields[0]), order=order)
        if mode == "static" and 1 <= len(fields) <= 2:
            steps = tuple(int(step) for step in fields[0].split(","))
            return StepCacheConfig("static", steps=steps, order=int(fields[1]) if len(fields) == 2 else 1)
    except ValueError as err:
        raise ConfigError(f"--cache {text!r}: {err}; {usage}") from err
    raise ConfigError(f"--cache {text!r} is not a step cache; {usage}")
