"""The diffusers FLUX.1 pipeline classes optimize() takes (every one whose transformer is a FluxTransformer2DModel), and
whether a loaded model fits the class (its transformer's input channels are what the class packs)."""

from __future__ import annotations

from .errors import ConfigError


def check_flux_pipeline(pipe) -> None:
    """optimize() takes every diffusers FLUX.1 pipeline whose transformer is a FluxTransformer2DModel (FluxPipeline,
    FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxFillPipeline, FluxControl*Pipeline,
    FluxControlNetPipeline, ...): the steps touch the transformer, the VAE and encode_prompt, which they share."""
    from diffusers import FluxTransformer2DModel

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, FluxTransformer2DModel) or not hasattr(pipe, "vae"):
        what = type(transformer).__name__ if transformer is not None else "no transformer"
        raise ConfigError(
            f"optimize() takes a diffusers FLUX.1 pipeline with a FluxTransformer2DModel (FluxPipeline, "
            f"FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxFillPipeline, ...); got "
            f"{type(pipe).__name__} with {what}. FluxPriorReduxPipeline makes embeddings for one of those: optimise "
            "the pipeline that takes its outputs"
        )
    _check_task_fits_model(pipe, transformer.config.in_channels)


# the transformer input channels each diffusers pipeline class packs (noise latents 64, plus its conditioning latents)
_TASK_CHANNELS = {"FluxFillPipeline": 384, "FluxControlPipeline": 128, "FluxControlImg2ImgPipeline": 128,
                  "FluxControlInpaintPipeline": 128}  # fmt: skip
_MODEL_OF_CHANNELS = {64: "FLUX.1 dev / schnell / Kontext", 384: "FLUX.1 Fill", 128: "FLUX.1 Canny / Depth"}
_CLASSES_OF_CHANNELS = {64: "FluxPipeline (FluxEngine), FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline",
                        384: "FluxFillPipeline", 128: "FluxControlPipeline (or its Img2Img / Inpaint)"}  # fmt: skip


def _check_task_fits_model(pipe, in_channels: int) -> None:
    """A pipeline class packs a fixed number of latent channels for the transformer: a Fill model in FluxPipeline would
    denoise 96-channel latents and fail in the VAE after every step has run. Refused up front, naming the class."""
    import diffusers

    expected = 64
    for name, channels in _TASK_CHANNELS.items():
        if isinstance(pipe, getattr(diffusers, name)):
            expected = channels
    if in_channels != expected:
        model = _MODEL_OF_CHANNELS.get(in_channels, f"a {in_channels}-input-channel")
        classes = _CLASSES_OF_CHANNELS.get(in_channels, "the pipeline class it was trained with")
        raise ConfigError(
            f"{type(pipe).__name__} feeds its transformer {expected} latent channels; this transformer takes "
            f"{in_channels} ({model} model). Load it into {classes} and optimize() that"
        )
