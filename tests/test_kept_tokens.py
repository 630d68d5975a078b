"""The kept-token page and token export (ta_opd/tools/kept_tokens.py): golden structure."""

from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from ta_opd.errors import TAInputError
from ta_opd.tools.kept_tokens import EXPORT_COLUMNS, Header, TokenView, decode_tokens, export_rows, one_per_prompt, render_page


class Spans(HTMLParser):
    """Every token span of a page: (classes, title, text)."""

    def __init__(self):
        super().__init__()
        self.spans, self._cur, self.tags = [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "span" and "tok" in a.get("class", "").split() and "title" in a:
            self._cur = [a["class"].split(), a["title"], ""]

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            self.spans.append(tuple(self._cur))
            self._cur = None


def view(kept_at=((0, 1), (1, 0))):
    texts = [["a", "<b>", "&", "x"], ["\n", " ", "q", ""]]
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)  # (B=2, R=4); the last position is padding
    kept = np.zeros((2, 4), bool)
    for b, t in kept_at:
        kept[b, t] = True
    f = lambda base: torch.arange(8, dtype=torch.float32).reshape(2, 4) + base  # noqa: E731
    return TokenView.of(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), texts, torch.tensor(valid),
                        f(0.125), f(10.5), f(20.25), f(0) / 7, torch.tensor(kept), f(-3.0))


HEADER = Header(step=7, rho=0.1, kept_ratio=2 / 7, selector="teachability", title="toy_<run>")


def parse(page):
    p = Spans()
    p.feed(page)
    return p


def test_every_valid_token_appears_once_in_order():
    page = render_page(view(), HEADER)
    spans = parse(page).spans
    assert len(spans) == 7  # 4 + 3 valid positions; padding never shown
    assert [s[2] for s in spans] == ["a", "<b>", "&", "x", "↵\n", "·", "q"]  # unescaped by the parser


def test_kept_tokens_marked_and_only_those():
    spans = parse(render_page(view(), HEADER)).spans
    kept = [i for i, s in enumerate(spans) if "kept" in s[0]]
    assert kept == [1, 4]  # (0, 1) and (1, 0) in flattened valid order
    assert all(("KEPT" in s[1]) == ("kept" in s[0]) for s in spans)


def test_hover_titles_carry_the_numbers():
    spans = parse(render_page(view(), HEADER)).spans
    # (1, 2): flat index 6 -> D 6.125, C 16.5, H 26.25, score 6/7, advantage 3.0
    title = spans[6][1]
    for want in ("position 2", "token id 11", "not kept", "D=6.125", "C=16.500", "H=26.250", "score=0.857",
                 "advantage=3.000"):
        assert want in title, (want, title)


def test_html_escaping_of_markup_tokens():
    page = render_page(view(), Header(step=1, rho=0.1, kept_ratio=0.5, selector="<sel>", title="a&b"),
                       prompts=["1+2=<?>", "x&y"])
    assert page.count("<b>") == 2  # the header's selector and kept ratio; the token "<b>" never becomes a tag
    assert "&lt;b&gt;" in page and "&amp;" in page and "&lt;sel&gt;" in page and "a&amp;b" in page
    assert "1+2=&lt;?&gt;" in page and "x&amp;y" in page
    assert parse(page).tags.count("b") == 2


def test_header_and_shading():
    page = render_page(view(), HEADER)
    assert "step 7" in page and "ρ = 0.1" in page and "kept ratio <b>0.286</b>" in page
    assert "(2 of 7 positions in the batch)" in page and "toy_&lt;run&gt;" in page
    assert page.count("rgba(230,120,0,0.060)") == 1 and page.count("rgba(230,120,0,0.900)") == 1  # min, max
    shade = 0.06 + 0.84 * (3 / 6) ** 0.5  # (0, 3): score 3/7 of the range [0, 6/7], square-rooted
    assert f"rgba(230,120,0,{shade:.3f})" in page
    assert "<script" not in page and "http" not in page  # self-contained


def test_show_picks_the_sequences():
    assert len(parse(render_page(view(), HEADER, show=[0])).spans) == 4
    assert [s[2] for s in parse(render_page(view(), HEADER, show=[1])).spans] == ["↵\n", "·", "q"]
    assert one_per_prompt(8, group=4, count=3) == [0, 4, 1]  # first samples of both prompts first
    assert one_per_prompt(2, group=4, count=4) == [0, 1]


def test_export_rows_one_per_valid_position():
    rows = export_rows(view(), step=3)
    assert len(rows) == 7 and set(rows[0]) == {"step", *EXPORT_COLUMNS}
    r = rows[5]  # (1, 1)
    assert (r["sample"], r["position"], r["token_id"], r["token"], r["kept"]) == (1, 1, 10, " ", False)
    assert (r["D"], r["C"], r["H"], r["advantage"]) == (5.125, 15.5, 25.25, 2.0)
    assert r["score"] == pytest.approx(5 / 7)
    assert [x["kept"] for x in rows] == [False, True, False, False, True, False, False]


def test_decode_tokens_decodes_valid_positions_only():
    got = decode_tokens(lambda i: f"<{i}>", torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [1, 1]]).bool())
    assert got == [["<1>", ""], ["<3>", "<4>"]]


def test_bad_inputs_are_refused():
    v = view()
    with pytest.raises(TAInputError, match="kept marks a position outside valid"):
        view(kept_at=((1, 3),))
    with pytest.raises(TAInputError, match="score has shape"):
        TokenView.of(v.token_ids, v.texts, v.valid, v.D, v.C, v.H, v.score[:, :2], v.kept, v.advantage)
    with pytest.raises(TAInputError, match="texts must be 2 lists of 4"):
        TokenView.of(v.token_ids, [["a"], ["b"]], v.valid, v.D, v.C, v.H, v.score, v.kept, v.advantage)
    with pytest.raises(TAInputError, match=r"show=\[2\] must name"):
        render_page(v, HEADER, show=[2])
    with pytest.raises(TAInputError, match="prompts has 1 entries"):
        render_page(v, HEADER, prompts=["p"])
