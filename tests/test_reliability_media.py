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


# --------------------------------------------------------------------------- memory bombs
#
# Each bomb is a small file (or a small array with an odd rate) that claims, or costs, far
# more memory than the limits allow. They run in one child process whose address space is
# capped, so a regression fails here with a MemoryError instead of taking the machine down;
# the child reports the peak RSS each case added (VmHWM, reset before each case).

_PEAK_SCRIPT = r"""
import json, resource, sys, warnings
import numpy as np
from mmllm import media
from mmllm.chat import InputError, Limits, check_upload

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

cases = json.loads(sys.argv[1])
calls = {
    "video": lambda a: media.load_video(a).shape,
    "audio": lambda a: media.load_audio(a, 16000).shape,
    "audio_rate": lambda a: media.load_audio((np.zeros(a[0], np.float32), a[1]), 16000).shape,
    "upload": lambda a: check_upload(a, Limits(), ("video",)),
}
# Warm up the lazy imports (PIL plugins, soundfile, torchaudio) outside the measurement.
media.load_audio((np.zeros(800, np.float32), 8000), 16000)
media.load_video(np.zeros((1, 2, 2, 3), np.uint8))
warnings.simplefilter("ignore")
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + (1 << 30), hard))
out = {}
for name, (call, arg) in cases.items():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    try:
        result = "ok " + str(calls[call](arg))
    except (media.MediaError, InputError) as err:
        result = str(err)
    except Exception as err:  # e.g. MemoryError, or torch's allocator failing under the cap
        result = f"{type(err).__name__}: {err}"[:300]
    out[name] = {"peak_mb": (status("VmHWM") - base) / 1e6, "result": result}
print(json.dumps(out))
"""


def _gif_bomb(path, width, height, frames):
    """A GIF of ``frames`` 1x1-pixel frames on a ``width`` x ``height`` canvas, ~23 bytes a frame."""
    import struct

    data = b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF0, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
    frame += b"\x02\x02\x44\x01\x00"  # LZW, min code size 2: clear, pixel 0, end
    path.write_bytes(data + frame * frames + b"\x3b")
    return path


def _npz_bomb(path, shape):
    """A compressed .npz of zeros: a few hundred KB that holds ``prod(shape)`` bytes."""
    import zipfile

    from numpy.lib import format as npy

    size = int(np.prod(shape))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("frames.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunk = bytes(1 << 22)
            for start in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - start)])
    return path


def _silent_flac(path, seconds, rate):
    import soundfile

    with soundfile.SoundFile(str(path), "w", rate, 1, subtype="PCM_16", format="FLAC") as f:
        block = np.zeros(1 << 20, np.int16)
        for _ in range(0, seconds * rate, len(block)):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    import json
    import subprocess
    import sys
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("bombs")
    cases = {
        "gif": ("video", str(_gif_bomb(tmp / "bomb.gif", 2000, 2000, 80))),
        "gif_upload": ("upload", str(tmp / "bomb.gif")),
        "npz": ("video", str(_npz_bomb(tmp / "bomb.npz", (134, 1000, 1000, 3)))),
        "flac": ("audio", str(_silent_flac(tmp / "hour.flac", 3600, 16000))),
        "rate_4001": ("audio_rate", [8000, 4001]),
        "rate_48001": ("audio_rate", [8000, 48001]),
    }
    sizes = {name: Path(arg).stat().st_size for name, (_, arg) in cases.items() if isinstance(arg, str)}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), sizes


def test_gif_with_many_frames_on_a_huge_canvas_is_refused_from_its_header(bombs):
    out, sizes = bombs
    assert sizes["gif"] < 2500  # 80 frames of 2000x2000: 320 M pixels claimed
    assert out["gif"]["result"] == (
        f"video {out['gif']['result'].split(chr(39))[1]!r} is 80 frames of 2000x2000 pixels (320000000 in all), "
        "over the 100000000-pixel limit for a whole video; keep fewer frames or downscale them")
    assert out["gif"]["peak_mb"] < 60, out["gif"]


def test_gif_bomb_uploaded_to_the_demo_is_refused_without_decoding(bombs):
    out, _ = bombs
    assert out["gif_upload"]["result"].startswith("bomb.gif: not a readable video file (video ")
    assert "over the 100000000-pixel limit for a whole video" in out["gif_upload"]["result"]
    assert out["gif_upload"]["peak_mb"] < 60, out["gif_upload"]


def test_npz_zip_bomb_is_refused_from_the_npy_header(bombs):
    out, sizes = bombs
    assert sizes["npz"] < 600_000  # holds 402 MB of zeros
    assert "holds a (134, 1000, 1000, 3) uint8 array (402000000 bytes), over the 300000000-byte limit" in \
        out["npz"]["result"]
    assert out["npz"]["peak_mb"] < 30, out["npz"]


def test_long_flac_is_read_only_up_to_the_limit(bombs):
    out, sizes = bombs
    assert sizes["flac"] < 300_000  # one hour of silence at 16 kHz
    assert out["flac"]["result"] == "ok (9600000,)"  # 600 s at 16 kHz
    # 600 s of float32 is 38 MB; the whole hour would be 230 MB.
    assert out["flac"]["peak_mb"] < 100, out["flac"]


@pytest.mark.parametrize("rate, samples", [(4001, 32_000), (48001, 2_667)])
def test_odd_sample_rates_resample_in_bounded_memory(bombs, rate, samples):
    out = bombs[0][f"rate_{rate}"]
    assert out["result"] == f"ok ({samples},)"  # 8000 samples at `rate`, at 16 kHz, by 4:1 and 1:3
    assert out["peak_mb"] < 100, out  # an exact 4001:16000 kernel is ~1 GB, 48001:16000 ~3 GB


def test_pickled_npy_video_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MediaError, match=r"holds Python objects \(a pickle\), which are not loaded; save a numeric array"):
        load_video(tmp_path / "obj.npy")


def test_small_npz_video_is_read(tmp_path):
    np.savez_compressed(tmp_path / "v.npz", frames=np.full((2, 4, 5, 3), 7, np.uint8))
    out = load_video(tmp_path / "v.npz")
    assert out.shape == (2, 4, 5, 3) and (out == 7).all()


def test_long_flac_is_cut_with_a_warning(tmp_path):
    _silent_flac(tmp_path / "long.flac", 5, 8000)  # padded to whole blocks: 131 s
    with pytest.warns(UserWarning, match=r"audio is 131\.1 s long; using the first 2 s"):
        out = load_audio(tmp_path / "long.flac", SR, max_seconds=2)
    assert out.shape == (2 * SR,)


@pytest.mark.parametrize("rate", [500, 400_000])
def test_sample_rate_outside_the_supported_range_is_refused(rate):
    with pytest.raises(MediaError, match=rf"audio sample rate {rate} Hz is outside the supported 1000-384000 Hz"):
        load_audio((np.zeros(1000, np.float32), rate), SR)


# --------------------------------------------------------------------------- more input types


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 high; the top-left quadrant red
    arr[:8, :16] = [255, 0, 0]
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view", as phones write it
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    for source in (tmp_path / "phone.jpg", Image.open(tmp_path / "phone.jpg")):
        out = np.asarray(load_image(source)).astype(int)
        assert out.shape == (32, 16, 3)  # upright: 16 wide, 32 high
        assert out[4, 12, 0] > 200 and out[4, 12, 1] < 50  # red is now the top-right quadrant
        assert out[4, 3].max() < 50 and out[20, 12].max() < 50


@pytest.mark.parametrize("mode, expected", [
    ("La", [255, 255, 255]), ("LA", [255, 255, 255]), ("RGBa", [255, 255, 255]), ("PA", [255, 255, 255]),
])
def test_modes_with_alpha_are_composited_on_white(mode, expected):
    assert np.asarray(load_image(Image.new(mode, (2, 2))))[0, 0].tolist() == expected


def test_palette_with_alpha_in_the_palette_is_composited_on_white():
    im = Image.new("P", (2, 2), 1)
    im.putpalette([0, 0, 0, 255, 255, 0, 0, 0], rawmode="RGBA")  # index 1: transparent red
    assert np.asarray(load_image(im))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 65535, 255), ("I;16", 32896, 128), ("I", 2**31 - 1, 255), ("I", 2**30, 128), ("I", 200, 200),
    ("F", 0.5, 128),
])
def test_sixteen_and_thirty_two_bit_modes_are_scaled(mode, value, expected):
    assert np.asarray(load_image(Image.new(mode, (2, 2), value)))[0, 0].tolist() == [expected] * 3


@pytest.mark.parametrize("make, message", [
    (lambda: torch.zeros(3, 4, 4, device="meta"), "is on the meta device and holds no data; pass a tensor with real values"),
    (lambda: torch.zeros(4, 4, 3).to_sparse(), r"has torch.sparse_coo layout; pass a dense tensor \(x.to_dense\(\)\)"),
])
def test_meta_and_sparse_tensors_are_refused(make, message):
    with pytest.raises(MediaError, match=message):
        load_image(make())
    with pytest.raises(MediaError, match=message):
        load_audio(make().flatten() if make().layout == torch.strided else make(), SR)


def test_video_frames_of_different_sizes_are_refused():
    with pytest.raises(MediaError, match=r"frame 0 is 4x4 pixels but frame 1 is 5x6 pixels; resize the frames to one size"):
        load_video([np.zeros((4, 4, 3), np.uint8), np.zeros((6, 5, 3), np.uint8)])


def test_bool_is_not_a_sample_rate():
    with pytest.raises(MediaError, match=r"audio sample rate True is not a positive integer; pass \(waveform, rate_in_hz\)"):
        load_audio((np.zeros(100, np.float32), True), SR)


# --------------------------------------------------------------------------- the demo's uploads


def test_demo_upload_errors_show_the_file_name_not_the_server_path(tmp_path):
    from mmllm.chat import InputError, Limits, check_upload

    upload = tmp_path / "gradio-upload-4f2a" / "photo.png"
    upload.parent.mkdir()
    upload.write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(InputError) as err:
        check_upload(upload, Limits(), ("image",))
    assert str(err.value).startswith("photo.png: not a readable image file (cannot decode image 'photo.png' (")
    assert str(tmp_path) not in str(err.value)
