import numpy as np
import pytest

from transprune.mini.data import COLOURS, QUESTION_TYPES, SHAPES, sample


def test_samples_are_deterministic_and_splits_differ():
    a, b = sample("train", 7), sample("train", 7)
    assert (a.question, a.answer) == (b.question, b.answer)
    assert np.array_equal(np.array(a.image), np.array(b.image))
    assert not np.array_equal(np.array(sample("test", 7).image), np.array(a.image))


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answers_follow_from_the_objects(qtype):
    for i in range(30):
        s = sample("val", i, qtype=qtype)
        objs = s.objects
        if qtype == "colour":
            assert s.answer in COLOURS and any(o.colour == s.answer for o in objs)
        elif qtype == "count":
            word = s.question.split()[2]
            expected = sum(o.colour == word for o in objs) if word in COLOURS else sum(o.shape + "s" == word for o in objs)
            assert s.answer == str(expected)
        elif qtype == "exists":
            colour, shape = s.question.split()[3:5]
            assert s.answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in objs) else "no")
        elif qtype == "shape_left":
            assert s.answer in SHAPES
        else:
            assert s.answer in {o.digit for o in objs if o.digit is not None}
        # the relevant region is made of whole objects' pixels and marks at least one patch
        no_evidence = s.answer in ("0", "no") and not s.relevant.any()  # nothing of that kind in the scene
        if not no_evidence:
            assert s.relevant.any() and s.relevant_patches(6).shape == (16, 16)


def test_relevant_mask_covers_the_named_object():
    s = sample("test", 0, qtype="digit")
    target = [o for o in s.objects if o.digit == s.answer]
    assert any(s.relevant[o.cy, o.cx] for o in target)
    others = [o for o in s.objects if o.digit != s.answer]
    assert not any(s.relevant[o.cy, o.cx] for o in others)
