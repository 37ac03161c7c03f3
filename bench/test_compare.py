#!/usr/bin/env python3
"""Checks of bench/compare.py's own logic: how a race's result is classified, how the table
marks rsyncfs against the best peer, and that CPU accounting counts a process tree, reaped
children included. Run: python3 -m unittest discover -s bench -p 'test_*.py'"""
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

NAME, CA, CB, BASE = "race0.txt", b"from A", b"from B", b"base"
COPY = "race0.sync-conflict-x.txt"


class RaceOutcome(unittest.TestCase):
    def test_both_kept_on_both_sides_is_ideal(self):
        side = {NAME: CB, COPY: CA}
        o = compare.race_outcome([dict(side), dict(side)], NAME, CA, CB, BASE, False)
        self.assertTrue(o["ideal"])
        self.assertEqual(o["writes_lost"], [])
        self.assertEqual(o["sides"]["A"]["at_the_name"], "B")
        self.assertIn("both kept on both", o["summary"])

    def test_one_way_overwrite_loses_the_other_write(self):
        # lsyncd: A's write replaced B's on B, nothing kept B's.
        o = compare.race_outcome([{NAME: CA}, {NAME: CA}], NAME, CA, CB, BASE, False)
        self.assertFalse(o["ideal"])
        self.assertEqual(o["writes_lost"], ["B"])
        self.assertTrue(o["replicas_agree"])
        self.assertIn("lost B", o["summary"])

    def test_each_side_keeping_its_own_write_differs(self):
        # Unison in batch mode skips the conflict.
        o = compare.race_outcome([{NAME: CA}, {NAME: CB}], NAME, CA, CB, BASE, False)
        self.assertFalse(o["ideal"])
        self.assertFalse(o["replicas_agree"])
        self.assertEqual(o["writes_lost"], [])
        self.assertEqual(o["writes_on_one_side_only"], ["A", "B"])
        self.assertIn("differ", o["summary"])

    def test_a_later_overwrite_of_a_seen_write_is_not_a_loss(self):
        o = compare.race_outcome([{NAME: CB}, {NAME: CB}], NAME, CA, CB, BASE, True)
        self.assertTrue(o["ideal"])
        self.assertIn("overwrote", o["summary"])
        # The same end state without B having seen A's write loses A.
        o = compare.race_outcome([{NAME: CB}, {NAME: CB}], NAME, CA, CB, BASE, False)
        self.assertEqual(o["writes_lost"], ["A"])
        self.assertFalse(o["ideal"])

    def test_a_copy_on_one_side_only_is_not_ideal(self):
        o = compare.race_outcome([{NAME: CB, COPY: CA}, {NAME: CB}], NAME, CA, CB, BASE, False)
        self.assertFalse(o["ideal"])
        self.assertEqual(o["writes_on_one_side_only"], ["A"])


def result(p50, mb_s, races_ideal):
    race = compare.race_outcome([{NAME: CB, COPY: CA}] * 2 if races_ideal else [{NAME: CA}, {NAME: CB}],
                                NAME, CA, CB, BASE, False)
    race["gap_ms"] = 0
    return {"latency_ab": {"p50_ms": p50}, "big_file": {"mb_s": mb_s}, "races": [race]}


class Table(unittest.TestCase):
    CFG = {"files": 10, "size": 1 << 20}

    def row(self, text, label):
        return next(line for line in text.splitlines() if line.startswith(f"| {label}"))

    def test_ratio_to_the_best_peer_and_direction(self):
        results = {"rsyncfs": result(2.0, 100.0, True), "lsyncd": result(50.0, 400.0, False),
                   "syncthing": result(1000.0, 200.0, False), "rsync": None}
        text = compare.table(results, self.CFG)
        lat = self.row(text, "4 KiB A->B isolated, p50 ms")
        self.assertIn("0.04 (leads)", lat)  # 2 / 50, lower is better
        mbs = self.row(text, "1 MiB file, MB/s")
        self.assertIn("0.25 (**behind**)", mbs)  # 100 / 400, higher is better
        self.assertIn("rsyncfs only (leads)", self.row(text, "race, 0 ms apart"))

    def test_a_peer_that_is_also_ideal_is_named(self):
        results = {"rsyncfs": result(2.0, 100.0, True), "syncthing": result(1000.0, 200.0, True)}
        self.assertIn("ideal: rsyncfs, syncthing", self.row(compare.table(results, self.CFG), "race, 0 ms apart"))


    def test_first_sync_and_wan_rows_compare_rsyncfs_with_rsync(self):
        more = {"first_sync": {"files": 1000, "one_receiver_s": 3.0, "rsync_daemon_one_s": 2.0,
                               "two_receivers_s": 4.0, "rsync_daemon_two_s": 5.0, "restart_s": 0.5,
                               "rss_bytes_per_file": 150.0, "rss_beyond_caches_bytes_per_file": 90.0,
                               "caches_budget_bytes": 177 << 20},
                "wan": {"link": {"delay_ms_each_way": 50, "loss_each_way": 0.01},
                        "rsyncfs-bbr": {"big": {"bytes": 100 << 20, "s": 8.0},
                                        "latency_4k": {"p50_ms": 105.0, "p99_ms": 110.0}, "rtt_ms": 101.0},
                        "rsync-tcp-cubic": {"big": {"bytes": 100 << 20, "s": 16.0},
                                            "latency_4k": {"p50_ms": 400.0, "p99_ms": 500.0}}}}
        text = compare.table({"rsyncfs": result(2.0, 100.0, True), "rsync": None}, self.CFG, more)
        self.assertIn("1.5 (**behind**)", self.row(text, "first sync of 1,000 files, one joining, s"))
        self.assertIn("0.8 (leads)", self.row(text, "first sync of 1,000 files, two joining at once, s"))
        self.assertIn("caches included", self.row(text, "RSS per tracked file, bytes"))
        beyond = self.row(text, "RSS per tracked file beyond the caches, bytes")
        self.assertIn("90", beyond)
        self.assertIn("target 200; caches' budget 177 MiB", beyond)
        self.assertIn("0.5 (leads)", self.row(text, "WAN (50 ms each way, 1% loss): 100 MiB, s"))
        self.assertIn("round trip 101 ms", self.row(text, "WAN: 4 KiB, p50 ms"))
        # Without the extras, the table has none of their rows.
        self.assertNotIn("first sync", compare.table({"rsyncfs": result(2.0, 100.0, True)}, self.CFG))


class Usage(unittest.TestCase):
    def test_cpu_of_a_tree_counts_a_reaped_grandchild(self):
        # A shell whose child burns 0.3 s of CPU and exits inside the window; the shell reaps
        # it, so its time reaches the tree only through the shell's children times.
        burn = "import time\nwhile time.process_time() < 0.3: pass"
        with tempfile.TemporaryDirectory() as d:
            mark = os.path.join(d, "burnt")
            p = subprocess.Popen(["sh", "-c", f'sleep 0.3; {sys.executable} -c "{burn}"; touch {mark}; sleep 1'])
            try:
                u = compare.Usage([p.pid])
                compare.wait_until(lambda: os.path.exists(mark), 30, "the child to burn its CPU")
                got = u.stop()
            finally:
                p.wait()
        self.assertGreaterEqual(got["cpu_s"], 0.29)
        self.assertGreater(got["peak_rss_mib"], 0)


if __name__ == "__main__":
    unittest.main()
