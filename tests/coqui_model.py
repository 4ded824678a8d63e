"""A tiny, untrained Coqui VITS model made on the spot, for the ``coqui`` engine's tests.

Nothing is downloaded: the weights are random (the speech is noise, but it streams like a
real voice), the hidden sizes small so it loads and speaks in well under a second on the
CPU, and it reads characters, not phonemes (``use_phonemes=False``: no espeak needed).
Saved the way Coqui's own trainer saves a checkpoint (``{"model": state_dict, ...}``) with
its ``config.json``, so that ``TTS(model_path=..., config_path=...)`` loads it. Needs the
``TTS`` package (coqui-tts); run as a script to write one into a folder::

    python tests/coqui_model.py /tmp/tiny-coqui [speaker ...]
"""
from __future__ import annotations

import sys
from pathlib import Path


def make_tiny_vits(folder: str | Path, speakers: list[str] | None = None,
                   seed: int = 0) -> tuple[Path, Path]:
    """Write ``model.pth`` and ``config.json`` into ``folder`` and return their paths;
    with ``speakers``, a multi-speaker model (a speaker embedding, the names in its config)."""
    import torch
    from TTS.tts.configs.shared_configs import BaseAudioConfig, CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = VitsArgs(
        hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
        num_layers_text_encoder=1, num_layers_posterior_encoder=1, num_layers_flow=1,
        upsample_initial_channel_decoder=32, resblock_kernel_sizes_decoder=[3],
        resblock_dilation_sizes_decoder=[[1, 3, 5]], use_sdp=False, init_discriminator=False,
        use_speaker_embedding=bool(speakers), speaker_embedding_channels=8)
    config = VitsConfig(
        model_args=args,
        audio=BaseAudioConfig(sample_rate=16000, fft_size=512, win_length=512, hop_length=256,
                              num_mels=40, mel_fmax=None, do_trim_silence=False),
        use_phonemes=False, phoneme_language="en", text_cleaner="basic_cleaners", add_blank=True,
        characters=CharactersConfig(
            characters_class="TTS.tts.models.vits.VitsCharacters", pad="_", eos="", bos="",
            blank="<BLNK>", characters="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            punctuations="!'(),-.:;? ", phonemes=None, is_unique=True, is_sorted=True),
        speakers=list(speakers or []), test_sentences=[])
    config.model_args.out_channels = config.audio.fft_size // 2 + 1
    torch.manual_seed(seed)
    model = Vits(config)
    model_path, config_path = folder / "model.pth", folder / "config.json"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 0,
                "epoch": 0}, model_path)
    model.config.save_json(str(config_path))
    return model_path, config_path


if __name__ == "__main__":
    print(*make_tiny_vits(sys.argv[1], sys.argv[2:] or None), sep="\n")
