import os
import stat

from hf_blockcbo.io_utils import atomic_file


def test_atomic_outputs_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"], "no temporary file left behind"
