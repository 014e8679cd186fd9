"""`vlm-serve --ray` without the 'ray' extra: one clear line naming the install, exit status 2."""
from __future__ import annotations

import sys


def test_missing_ray_extra_names_the_install(tmp_path, monkeypatch, capsys):
    from vlm_core.runtime.server.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    assert main(["-m", str(tmp_path), "--ray", "--replicas", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: --ray needs the 'ray' extra (Ray Serve): pip install 'vlm-core[ray]'"]


def test_builder_arguments_from_the_command_line(tmp_path):
    from vlm_core.runtime.cluster.launch import builder_args
    from vlm_core.runtime.server.cli import build_parser
    from vlm_core.runtime.server.config import ServeConfig

    args = build_parser().parse_args(["-m", str(tmp_path), "--ray", "--replicas", "3", "--max-replicas", "6",
                                      "--no-affinity", "--threads", "2"])
    config = ServeConfig(model=str(tmp_path), threads=2)
    built = builder_args(config, args)
    assert built["replicas"] == 3 and built["min_replicas"] == 3 and built["max_replicas"] == 6
    assert built["affinity"] is False and built["threads"] == 2 and "port" not in built
