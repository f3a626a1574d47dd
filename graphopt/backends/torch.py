"""The ``torch`` target: the optimized graph as a ``torch.export`` program (``model.pt2``).

The program is the optimized GraphIR re-exported with its dynamic dims
(:func:`graphopt.backends.export.export_program`) and written by ``torch.export.save``. It runs
wherever the same torch version runs, with no ONNX translation in between: the reference target
for checking the other backends, and the one that keeps custom ops a pass may insert.

Loading goes through :class:`graphopt.runtime.torch_runner.TorchRunner`, which refuses archives
that would make ``torch.export.load`` unpickle anything (see that module).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.backends.base import Backend, Lowered
from graphopt.errors import ArtifactError, BackendError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR
    from graphopt.runtime.torch_runner import TorchRunner

MODEL_FILE = "model.pt2"


class TorchBackend(Backend):
    """torch.export program (.pt2) run by PyTorch.

    Options (``load``): ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: CUDA when torch
    sees a GPU, else CPU). Outputs come back on that device.
    """

    name = "torch"

    def lower(self, ir: GraphIR, out_dir: Path, options: dict[str, Any]) -> Lowered:
        import torch

        from graphopt.backends.export import export_program

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tp = ir.meta.get("tensor_parallel")
        if tp:  # one program per rank, cut from the simulated graph (graphopt.parallel)
            from graphopt.parallel import rank_ir

            files = []
            for rank in range(int(tp["world_size"])):
                files.append(_save(export_program(rank_ir(ir, rank)), out_dir / f"model.rank{rank}.pt2"))
            return Lowered(files=files, payload={"format": "pt2", "rank_files": files, "torch": torch.__version__},
                           notes=[f"tensor-parallel: {len(files)} rank programs"])
        return Lowered(files=[_save(export_program(ir), out_dir / MODEL_FILE)],
                       payload={"format": "pt2", "file": MODEL_FILE, "torch": torch.__version__})

    def load(self, artifact_dir: Path, manifest: dict[str, Any], device: str | None = None,
             **_: Any) -> TorchRunner:
        from graphopt.runtime.torch_runner import TorchRunner

        payload = manifest["payload"] if isinstance(manifest.get("payload"), dict) else manifest
        tp = manifest.get("tensor_parallel")
        if tp:
            from graphopt.parallel import init_rank, rank_device

            files = payload.get("rank_files")
            if not isinstance(files, list) or len(files) != int(tp.get("world_size", 0)):
                raise ArtifactError(f"manifest of {artifact_dir} is tensor-parallel over {tp.get('world_size')} ranks "
                                    f"but lists rank programs {files!r}; rebuild the artifact")
            device = rank_device(device)  # CPU (gloo) unless a GPU is asked for: then this rank's own (NCCL)
            rank = init_rank(artifact_dir, tp, device)
            file = files[rank]
            if not isinstance(file, str) or Path(file).name != file:
                raise ArtifactError(f"manifest names torch program {file!r}; it must be a file name inside the "
                                    "artifact directory")
            from graphopt.parallel import RankRunner

            return RankRunner(TorchRunner(Path(artifact_dir) / file, device=device), rank, len(files))
        else:
            file = payload.get("file", MODEL_FILE)
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ArtifactError(f"manifest names torch program {file!r}; it must be a file name inside the "
                                "artifact directory")
        return TorchRunner(Path(artifact_dir) / file, device=device)

    def load_for_verification(self, artifact_dir: Path, manifest: dict[str, Any]) -> Any:
        if manifest.get("tensor_parallel"):  # the real thing: one process per rank, on gloo
            from graphopt.parallel import SpawnedRanks

            return SpawnedRanks(artifact_dir, manifest)
        return self.load(artifact_dir, manifest)


def _save(ep: Any, path: Path) -> str:
    import torch

    try:
        torch.export.save(ep, path)
    except Exception as e:
        raise BackendError(f"torch.export.save could not write {path}: {type(e).__name__}: {e}") from e
    return path.name
