import io

import numpy as np
import pytest
from PIL import Image

from captioner.image import UnreadableImageError
from tests.test_checkpoint import _images


def test_caption_returns_plain_results_with_normalised_attention(captioner):
    results = captioner.caption(_images(2), beam_size=2, max_length=6)
    assert len(results) == 2
    for r in results:
        assert isinstance(r.caption, str)
        assert len(r.tokens) == len(r.token_logprobs) <= 6
        assert r.attention.shape == (len(r.tokens), 4, 4)
        np.testing.assert_allclose(r.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
        assert not any(t in ("<start>", "<pad>", "<end>") for t in r.tokens)


def test_bytes_paths_and_pil_images_give_the_same_caption(tmp_path, captioner):
    image = _images(1)[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    image.save(tmp_path / "x.png")
    a, b, c = captioner.caption([image, buf.getvalue(), tmp_path / "x.png"], max_length=6)
    assert a.tokens == b.tokens == c.tokens


def test_batched_captioning_equals_one_image_at_a_time(captioner):
    images = _images(5, seed=3)
    batched = captioner.caption(images, beam_size=3, max_length=8)
    for image, result in zip(images, batched, strict=True):
        [single] = captioner.caption([image], beam_size=3, max_length=8)
        assert single.tokens == result.tokens
        np.testing.assert_allclose(single.attention, result.attention, atol=1e-6)


def test_greedy_and_sampling_methods(captioner):
    images = _images(2)
    greedy = captioner.caption(images, method="greedy", max_length=6)
    beam1 = captioner.caption(images, beam_size=1, max_length=6)
    assert [r.tokens for r in greedy] == [r.tokens for r in beam1]
    s1 = captioner.caption(images, method="sample", seed=4, max_length=6)
    s2 = captioner.caption(images, method="sample", seed=4, max_length=6)
    assert [r.tokens for r in s1] == [r.tokens for r in s2]
    with pytest.raises(ValueError, match="method"):
        captioner.caption(images, method="nucleus")


def test_no_attention_model_returns_none(vocab):
    from captioner.caption.captioner import Captioner
    from tests.conftest import tiny_model

    cap = Captioner(tiny_model(len(vocab), attention=False), vocab)
    [r] = cap.caption(_images(1), max_length=5)
    assert (
        r.attention is None
        and r.to_dict()["attention"] is None
        and r.to_dict("png")["attention"] is None
    )


def test_bad_image_bytes_raise_the_library_error(captioner):
    with pytest.raises(UnreadableImageError):
        captioner.caption([b"not an image"])


def test_empty_input_gives_empty_output(captioner):
    assert captioner.caption([]) == []


def test_vocab_size_mismatch_is_refused(vocab):
    from captioner.caption.captioner import Captioner
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match="vocab"):
        Captioner(tiny_model(len(vocab) + 1), vocab)


def test_image_is_rgb_after_decoding(tmp_path):
    Image.new("L", (5, 5)).save(tmp_path / "g.png")
    from captioner.image import load_image

    assert load_image(tmp_path / "g.png").mode == "RGB"


def test_a_caption_cut_at_max_length_says_it_is_unfinished(vocab):
    from captioner.caption.captioner import Captioner
    from tests.conftest import scripted_model

    captioner = Captioner(scripted_model(vocab, ["two", "green", "triangles"]), vocab)
    for method in ("beam", "greedy", "sample"):
        [ended] = captioner.caption(_images(1), method=method, max_length=20)
        assert ended.tokens == ["two", "green", "triangles"] and ended.finished is True
        [cut] = captioner.caption(_images(1), method=method, max_length=1)
        assert cut.tokens == ["two"] and cut.finished is False
        assert (ended.to_dict()["finished"], cut.to_dict()["finished"]) == (True, False)


def test_an_untrained_model_that_never_ends_is_cut(captioner):
    for result in captioner.caption(_images(2), beam_size=2, max_length=3):
        assert len(result.tokens) == 3 and result.finished is False
