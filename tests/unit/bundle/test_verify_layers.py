"""``edgepack verify`` walks the member names of the bundle's image.tar layers with the same path
policy as ``build --base`` (packager.agent.paths.LayerWalk): a bundle whose image would write
outside the root filesystem is exit 8, one line naming the layer blob and the member."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode
from tests.unit.ota import synth


@pytest.mark.parametrize(("member", "says"), [
    ("../../../tmp/attack/pwned", "'..' component"),
    ("/tmp/attack/pwned", "absolute member name"),
])
def test_verify_refuses_an_image_layer_member_outside_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    member: str, says: str,
) -> None:
    real = synth._layer

    def crafted(path: str, content: bytes) -> tuple[bytes, str]:
        return real(member if path.endswith("model.onnx") else path, content)

    monkeypatch.setattr(synth, "_layer", crafted)
    bundle = synth.make_bundle(tmp_path / "b").path
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(bundle)])
    _, err = capsys.readouterr()
    assert exit_info.value.code == ExitCode.VERIFY, err
    assert says in err and "image.tar: blobs/sha256/" in err and "layer 2" in err, err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(bundle), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == ExitCode.VERIFY and says in document["message"]
