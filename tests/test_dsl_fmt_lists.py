"""`agp fmt` keeps a comment inside a list in that list, beside or before the element the author
put it with, by printing the list one element per line; idempotent, the AST unchanged."""
from __future__ import annotations

import textwrap

from pipeline_dsl.fmt import format_text
from pipeline_dsl.parser import parse


def _fmt(text: str) -> str:
    text = textwrap.dedent(text)
    once, diags = format_text(text)
    assert diags == []
    assert format_text(once)[0] == once                       # idempotent
    before, after = parse(text)[0], parse(once)[0]
    assert after == before                                      # same program
    assert [c.text for c in after.comments] == [c.text for c in before.comments]
    return once


def test_comments_before_between_and_after_elements_stay_in_the_list():
    out = _fmt('''\
        pipeline p {
            tags = [   # heading
                "a", "b",   # about b
                # before c
                "c"
                # after c
            ]
            mode = balanced
        }
    ''')
    assert out == textwrap.dedent('''\
        pipeline p {
            tags = [
                # heading
                "a",
                "b",  # about b
                # before c
                "c",
                # after c
            ]
            mode = balanced
        }
    ''')


def test_a_comment_in_a_nested_list_stays_in_the_inner_list():
    out = _fmt('''\
        pipeline p {
            grid = [[1, 2], [3,  # about three
                4], 5]
        }
    ''')
    assert out == textwrap.dedent('''\
        pipeline p {
            grid = [
                [1, 2],
                [
                    3,  # about three
                    4,
                ],
                5,
            ]
        }
    ''')


def test_a_comment_in_a_stage_list_does_not_move_beside_another_stage():
    # Put on one line, `["x", "y"]` would leave `# about x` to sit beside `fn` or before
    # stage b, where it reads as theirs.
    out = _fmt('''\
        pipeline p {
            stage a : python { fn = "h:f"  stop = ["x", # about x
                "y"] }
            stage b : python { fn = "h:g" }
            a -> b
        }
    ''')
    assert out == textwrap.dedent('''\
        pipeline p {
            stage a : python {
                fn   = "h:f"
                stop = [
                    "x",  # about x
                    "y",
                ]
            }
            stage b : python { fn = "h:g" }
            a -> b
        }
    ''')


def test_a_list_without_comments_stays_on_one_line_beside_a_trailing_comment():
    out = _fmt('''\
        pipeline p {
            stage a : python { fn = "h:f"  stop = ["x",
                "y"] }   # about a
        }
    ''')
    assert 'stage a : python { fn = "h:f"  stop = ["x", "y"] }  # about a' in out
