"""Label layout: background, foreground classes, the ignore label and regions, decided in one place."""

from __future__ import annotations

from autoseg.data.labels import foreground_names, foreground_values, n_outputs


def test_the_ignore_label_is_neither_a_class_nor_an_output():
    labels = {"background": 0, "liver": 1, "tumour": 2, "unlabelled": 3}
    assert foreground_values(labels) == (1, 2, 3)
    assert foreground_values(labels, ignore_label=3) == (1, 2)
    assert foreground_names(labels, ignore_label=3) == ("liver", "tumour")
    assert n_outputs(labels, {}, ignore_label=3) == 3  # background, liver, tumour
    assert n_outputs(labels, {"whole": (1, 2), "core": (2,)}, ignore_label=3) == 2  # one sigmoid per region


def test_values_come_sorted_whatever_the_order_of_names():
    labels = {"b": 5, "background": 0, "a": 2}
    assert foreground_values(labels) == (2, 5) and foreground_names(labels) == ("a", "b")
