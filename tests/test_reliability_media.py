"""Bad media input: each case is either handled (and the result checked) or refused with a
MediaError that names the input and the fix. docs/RELIABILITY.md lists them."""

import io
import wave

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mmllm.media import MAX_PIXELS, MediaError, load_audio, load_image, load_video

SR = 16000


def _png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_wav(path, data, rate, channels):
    pcm = (np.clip(data, -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


RED = np.zeros((8, 8, 3), np.uint8)
RED[..., 0] = 255


# --------------------------------------------------------------------------- images: files


def test_truncated_image_is_refused(tmp_path):
    data = _png_bytes(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cannot decode image .*t.png"):
        load_image(tmp_path / "t.png")


def test_corrupt_image_is_refused(tmp_path):
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(MediaError, match="valid PNG or JPEG"):
        load_image(tmp_path / "c.png")


def test_zero_byte_file_is_refused(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_image(tmp_path / "z.png")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_wrong_extension_is_read_by_content(tmp_path):
    (tmp_path / "red.jpg").write_bytes(_png_bytes(RED))  # a PNG named .jpg
    assert np.asarray(load_image(tmp_path / "red.jpg"))[0, 0].tolist() == [255, 0, 0]


def test_audio_file_named_png_is_refused(tmp_path):
    _write_wav(tmp_path / "sound.png", np.zeros(100), SR, 1)
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(tmp_path / "sound.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # tiny file, huge canvas
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(MediaError, match="pixels|too large"):
        load_image(tmp_path / "bomb.png")


def test_huge_array_is_refused():
    huge = np.broadcast_to(np.uint8(0), (9000, 9000, 3))  # no memory behind it
    with pytest.raises(MediaError, match="downscale"):
        load_image(huge)


def test_cmyk_image_becomes_rgb(tmp_path):
    Image.fromarray(RED).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    px = np.asarray(load_image(tmp_path / "cmyk.jpg"))[4, 4]
    assert px[0] > 200 and px[1] < 60 and px[2] < 60


def test_palette_image_becomes_rgb(tmp_path):
    Image.fromarray(RED).convert("P").save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 0, 0]


def test_palette_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0] * 256)
    im.info["transparency"] = 0
    im.save(tmp_path / "pt.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "pt.png"))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_image_is_scaled(tmp_path):
    arr = np.full((4, 4), 65535, np.uint16)
    arr[0, 0] = 32896  # mid grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "16.png")
    out = np.asarray(load_image(tmp_path / "16.png"))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [128, 128, 128]


def test_grayscale_becomes_rgb():
    out = np.asarray(load_image(Image.new("L", (3, 3), 77)))
    assert out.shape == (3, 3, 3) and (out == 77).all()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red
    rgba[1, 1] = [0, 0, 0, 0]  # fully transparent black -> white
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_float_array_in_unit_range():
    out = np.asarray(load_image(np.full((2, 2, 3), 0.5, np.float32)))
    assert (out == 128).all()


def test_float_array_with_nan_is_refused():
    arr = np.zeros((2, 2, 3), np.float32)
    arr[0, 0, 0] = np.nan
    with pytest.raises(MediaError, match="NaN"):
        load_image(arr)


def test_negative_float_array_says_how_to_map_it():
    with pytest.raises(MediaError, match=r"\(x \+ 1\) / 2"):
        load_image(-np.ones((2, 2, 3), np.float32))


def test_array_with_five_channels_is_refused():
    with pytest.raises(MediaError, match="1-4 channels"):
        load_image(np.zeros((8, 8, 5), np.uint8))


def test_channels_first_tensor():
    t = torch.zeros(3, 5, 7)
    t[0] = 1.0
    out = np.asarray(load_image(t))
    assert out.shape == (5, 7, 3) and out[0, 0].tolist() == [255, 0, 0]


def test_unsupported_image_type_is_refused():
    with pytest.raises(MediaError, match="unsupported image input dict"):
        load_image({"pixels": 1})


# --------------------------------------------------------------------------- audio


def test_audio_at_another_rate_is_resampled():
    out = load_audio((np.zeros(44100, np.float32), 44100), SR)
    assert out.shape == (SR,)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_multichannel_audio_becomes_mono(layout):
    stereo = np.stack([np.ones(1000), -np.ones(1000) * 0.5]).astype(np.float32)
    arr = stereo if layout == "channels_first" else stereo.T
    out = load_audio(arr, SR)
    assert out.shape == (1000,) and np.allclose(out, 0.25)


def test_zero_length_audio_is_refused():
    with pytest.raises(MediaError, match="zero samples"):
        load_audio(np.zeros(0, np.float32), SR)


def test_very_long_audio_is_cut_with_a_warning():
    with pytest.warns(UserWarning, match="first 2 s"):
        out = load_audio(np.zeros(5 * SR, np.float32), SR, max_seconds=2)
    assert out.shape == (2 * SR,)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_audio_is_refused(bad):
    arr = np.zeros(100, np.float32)
    arr[3] = bad
    with pytest.raises(MediaError, match="NaN or Inf"):
        load_audio(arr, SR)


def test_integer_pcm_is_scaled():
    out = load_audio(np.array([0, 16384, -32768], np.int16), SR)
    assert np.allclose(out, [0.0, 0.5, -1.0])


def test_wav_file_any_rate_and_channels(tmp_path):
    _write_wav(tmp_path / "s.wav", np.full(16000, 0.5), 8000, 2)  # 1 s of stereo at 8 kHz
    out = load_audio(tmp_path / "s.wav", SR)
    assert out.shape == (SR,) and abs(float(np.median(out)) - 0.5) < 0.01


def test_corrupt_wav_is_refused(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk" * 4)
    with pytest.raises(MediaError, match="cannot decode audio"):
        load_audio(tmp_path / "bad.wav", SR)


def test_bad_sample_rate_is_refused():
    with pytest.raises(MediaError, match="sample rate"):
        load_audio((np.zeros(10, np.float32), 0), SR)


# --------------------------------------------------------------------------- video


def test_video_with_zero_frames_is_refused():
    with pytest.raises(MediaError, match="zero frames"):
        load_video(np.zeros((0, 8, 8, 3), np.uint8))


def test_unreadable_video_is_refused(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(MediaError, match="cannot decode video"):
        load_video(tmp_path / "v.mp4")


def test_channels_first_video_is_transposed():
    out = load_video(torch.ones(2, 3, 4, 5))
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8 and (out == 255).all()


def test_gif_video_file(tmp_path):
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (0, 120, 250)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = load_video(tmp_path / "a.gif")
    assert out.shape == (3, 6, 6, 3)


def test_list_of_frames_video():
    out = load_video([Image.new("L", (4, 4), 9), np.zeros((4, 4, 3), np.uint8)])
    assert out.shape == (2, 4, 4, 3)


# --------------------------------------------------------------------------- prompts and modalities


def test_prompt_longer_than_the_context_window(tiny):
    with pytest.raises(ValueError, match="over the model's max_length"):
        tiny.generate("word " * 2000)


def test_fewer_media_than_placeholders(tiny):
    with pytest.raises(ValueError, match="placeholder"):
        tiny.generate("<image> and <image>", image=np.zeros((8, 8, 3), np.uint8))


def test_unknown_modality_is_refused(tiny):
    from mmllm.generation import build_request

    with pytest.raises(ValueError, match="cannot read \\['smell'\\]"):
        build_request(tiny, "hi", {"smell": b"..."})


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
                  shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6)))
def test_any_array_is_an_rgb_image_or_a_media_error(arr):
    try:
        im = load_image(arr)
    except MediaError:
        return
    assert im.mode == "RGB" and im.size[0] > 0 and im.size[1] > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(dtype=st.sampled_from([np.int16, np.int32, np.float32, np.float64]),
                  shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=50)),
       st.sampled_from([8000, 16000, 22050]))
def test_any_array_is_a_waveform_or_a_media_error(arr, rate):
    try:
        out = load_audio((arr, rate), SR)
    except MediaError:
        return
    assert out.ndim == 1 and out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_prompt_text_is_processed_or_refused_clearly(tiny, text):
    try:
        batch = tiny.processor([[{"role": "user", "content": text}]])
    except ValueError as err:
        assert "placeholder" in str(err) or "max_length" in str(err)
        return
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[1] > 0
