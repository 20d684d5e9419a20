"""sweep.html from a store: one scatter per model with its Pareto frontier, a sortable table, nothing loaded."""
from html.parser import HTMLParser

from dfmpc_deploy.sweep.cell import failed_outcome
from dfmpc_deploy.sweep.html import render_sweep_html, varying_keys
from dfmpc_deploy.sweep.pareto import pareto_front
from dfmpc_deploy.sweep.store import Store


def _outcome(top1, size, method="dfmpc"):
    return {"ok": True, "method": method, "top1": top1, "top1_variants": {"fp32": 81.0, method: top1},
            "size_bytes": size, "fp32_bytes": 1_084_392, "bits": "2/6", "avg_code_bits": 4.0, "seconds": 3.5}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.srcs, self.rings = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]
        self.rings += tag == "circle" and a.get("stroke") == "#111"
        if tag not in ("meta", "line", "circle", "rect", "polyline", "br"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.rings += tag == "circle" and dict(attrs).get("stroke") == "#111"

    def handle_endtag(self, tag):
        if tag in ("meta", "line", "circle", "rect", "polyline", "br"):
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _store(tmp_path):
    s = Store(tmp_path / "r.sqlite")
    pts = {"a": (70.0, 150_000, "rtn"), "b": (78.0, 150_000, "dfmpc"), "c": (60.0, 100_000, "rtn"),
           "d": (59.0, 120_000, "dfmpc"), "e": (79.5, 200_000, "dfmpc")}
    cells = [(k, "m1", {"model": "m1", "method": m, "bits": "2/6" if size < 160_000 else "4", "seed": 0})
             for k, (_, size, m) in pts.items()]
    cells += [("f", "m1", {"model": "m1", "method": "rtn", "bits": "3/6", "seed": 1}),
              ("g", "m2", {"model": "m2", "method": "rtn", "bits": "2/6", "seed": 0}),
              ("h", "m2", {"model": "m2", "method": "rtn", "bits": "4", "seed": 0})]
    s.add(cells)
    for k, (top1, size, m) in pts.items():
        s.finish(k, _outcome(top1, size, m), "ray")
    s.finish("g", failed_outcome("weights file '<script>alert(1)</script>' does not exist"), "ray")
    return s, pts


def test_page_has_a_frontier_per_model_and_a_sortable_table(tmp_path):
    s, pts = _store(tmp_path)
    rows = s.rows()
    page = render_sweep_html(rows, "ray")
    p = _Tags()
    p.feed(page)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert p.srcs == [] and "<link" not in page and "@import" not in page  # self-contained
    assert page.count("<svg") == 1  # m2 has no finished cell: a sentence instead of a chart
    front = pareto_front([(pts[k][1], pts[k][0]) for k in "abcde"])
    assert [("abcde")[i] for i in front] == ["c", "b", "e"] and p.rings == len(front)
    assert "Pareto frontier (3 of 5 finished cells" in page and "FP32 81.00 %" in page
    assert page.count("<tr>") == 1 + len(rows) and 'class="grid sortable"' in page and "addEventListener" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-v="150000"' in page and '<td class="failed">failed</td>' in page
    assert "No finished cell" in page and "engine ray" in page
    s.close()


def test_varying_keys_are_the_columns_that_tell_cells_apart(tmp_path):
    s, _ = _store(tmp_path)
    assert varying_keys(s.rows()) == ["method", "bits", "seed"]
    assert varying_keys(s.rows()[:1]) == []
    s.close()


def test_axis_labels_stay_distinct_when_sizes_differ_in_the_fourth_digit():
    from dfmpc_deploy.sweep.html import _label, _range

    for lo, hi in [(0.148121, 0.148250), (0.1, 0.21), (12.5, 78.0), (2.851393, 2.958794)]:
        tks = _range(lo, hi)
        labels = [_label(t, tks) for t in tks]
        assert len(set(labels)) == len(labels) and tks[0] <= lo and tks[-1] >= hi, labels
