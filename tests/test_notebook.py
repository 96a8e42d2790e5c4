"""What a Jupyter user sees: HTML tables, and flow events as a pandas DataFrame."""

from __future__ import annotations

import pytest
from lbtest import datapath, packet, run

import pyebpflb as lb

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

WEB = lb.Service("10.96.0.10", 80, name="default/<web>", backends=[lb.Backend("10.0.1.1", 8080)])


def test_html_tables_escape_and_show_the_values() -> None:
    html = WEB._repr_html_()
    assert "<table>" in html and "10.0.1.1:8080" in html
    assert "default/&lt;web&gt;" in html and "<web>" not in html
    with datapath("nb-html") as dp:
        dp.sync([WEB])
        run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1234, 80, flags="S"))
        shown = dp._repr_html_()
        assert "default/&lt;web&gt;" in shown and "10.96.0.10:80/tcp" in shown
        stats = dp.stats()._repr_html_()
        assert "<td>-&gt; 10.0.1.1:8080</td><td>1</td>" in stats
        assert "events sent" in stats
        assert "<td>10.0.1.1:8080</td><td>1</td>" in dp.stats(WEB)._repr_html_()


def test_flows_dataframe() -> None:
    pandas = pytest.importorskip("pandas", reason="pandas is a dev dependency; not installed")
    with datapath("nb-frame") as dp:
        dp.sync([WEB])
        monitor = dp.open_monitor()
        try:
            for port in (1000, 1001):
                run(
                    dp,
                    "lb_ingress",
                    packet(4, "tcp", "10.1.0.5", "10.96.0.10", port, 80, flags="S"),
                )
            events = list(monitor.events(0.2))
        finally:
            monitor.close()
        frame = dp.flows_dataframe(events)
        assert isinstance(frame, pandas.DataFrame)
        assert list(frame["source_port"]) == [1000, 1001]
        assert set(frame["backend"]) == {"10.0.1.1:8080"}
        assert str(frame["time"].dtype).startswith("datetime64")
