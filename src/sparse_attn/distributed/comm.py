"""Point-to-point and all-to-all exchanges over a torch.distributed process group, with every
byte sent counted (`CommStats`); `MeshComm`: one `Comm` per dimension of a 2-D ("ulysses", "cp")
mesh."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Comm", "CommStats", "MeshComm", "MESH2D_DIMS", "Pending", "resolve_group", "is_mesh2d"]

# the dimension names of a 2-D Ulysses x sequence-parallel mesh (either order)
MESH2D_DIMS = ("ulysses", "cp")


@dataclass
class CommStats:
    """Bytes this rank sent, by exchange kind ("kv", "dkv", "a2a", "agree"), and message count."""

    bytes_sent: dict = field(default_factory=dict)
    messages: int = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)
        self.messages += 1

    def total(self, *kinds: str) -> int:
        return sum(v for k, v in self.bytes_sent.items() if not kinds or k in kinds)

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.messages = 0


@dataclass
class Pending:
    """Transfers posted and not yet waited for: their requests, the receive buffers by source
    (filled once waited for) and the send buffers they read (kept alive until then)."""

    requests: list
    received: dict
    keep: list = field(default_factory=list)


def resolve_group(group):
    """A process group from a `DeviceMesh` (1-D, or a mesh with a "cp"/"context" dimension), a
    process group, or None (the default group)."""
    if group is None:
        if not dist.is_initialized():
            raise ValueError("group is None and torch.distributed is not initialised: call "
                             "torch.distributed.init_process_group first or pass a DeviceMesh / process group")
        return dist.group.WORLD
    if isinstance(group, _device_mesh_type()):
        if is_mesh2d(group):  # taking its "cp" dimension alone would drop the head split
            raise ValueError(f"group is a DeviceMesh with dims {group.mesh_dim_names}: a 'ulysses' dimension makes it "
                             "a 2-D Ulysses x cp mesh, which context_parallel_attention takes whole (or as "
                             "MeshComm(mesh)); for one dimension pass mesh['cp'] or mesh['ulysses']")
        if group.ndim == 1:
            return group.get_group()
        names = group.mesh_dim_names or ()
        for name in ("cp", "context"):
            if name in names:
                return group.get_group(name)
        raise ValueError(f"group is a {group.ndim}-D DeviceMesh with dims {names}: name one dimension 'cp' or "
                         "'context', or pass mesh['cp']")
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group must be a DeviceMesh, a ProcessGroup or None, got {type(group).__name__}")


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        return ()
    return DeviceMesh


def is_mesh2d(group) -> bool:
    """Whether `group` asks for the 2-D Ulysses x cp scheme: a `MeshComm`, or a DeviceMesh of more
    than one dimension with a "ulysses" dimension (checked whole by `MeshComm`)."""
    if isinstance(group, MeshComm):
        return True
    return isinstance(group, _device_mesh_type()) and group.ndim > 1 and "ulysses" in (group.mesh_dim_names or ())


class Comm:
    """One rank's view of a process group."""

    def __init__(self, group) -> None:
        self.group = resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.stats = CommStats()

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    # Every transfer of the schemes goes through `post` / `post_all_to_all` and `wait` (the
    # blocking `exchange` / `all_to_all` are these two in a row), so that a subclass can time,
    # record or replace the transport (benchmarks/cp_scaling.py: the communication alone, the
    # compute alone) without touching the schemes.
    def post(self, sends: dict, recv_shapes: dict, dtype, device, kind: str) -> "Pending":
        """Point-to-point, not waited for: send sends[dst] (a tensor) to each dst and receive a
        tensor of recv_shapes[src] from each src, all posted at once (`batch_isend_irecv`)."""
        ops, out, keep = [], {}, []
        for src, shape in recv_shapes.items():
            out[src] = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, out[src], self.global_rank(src), self.group))
        for dst, t in sends.items():
            t = t.contiguous()
            keep.append(t)  # alive until the send completes
            ops.append(dist.P2POp(dist.isend, t, self.global_rank(dst), self.group))
            self.stats.add(kind, t.numel() * t.element_size())
        return Pending(dist.batch_isend_irecv(ops) if ops else [], out, keep)

    def post_all_to_all(self, sends: dict, recv_shapes: dict, dtype, device, kind: str) -> "Pending":
        """One uneven all-to-all (`all_to_all_single` with split sizes), not waited for: the same
        contract as `post`; pairs with nothing to move send zero elements."""
        flat_in, in_splits = [], []
        for dst in range(self.world_size):
            t = sends.get(dst)
            in_splits.append(0 if t is None else t.numel())
            if t is not None:
                flat_in.append(t.reshape(-1))
                self.stats.add(kind, t.numel() * t.element_size())
        out_splits = [int(torch.Size(recv_shapes[s]).numel()) if s in recv_shapes else 0
                      for s in range(self.world_size)]
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        flat_in = torch.cat(flat_in) if flat_in else torch.empty(0, dtype=dtype, device=device)
        work = dist.all_to_all_single(flat_out, flat_in, out_splits, in_splits, group=self.group, async_op=True)
        out, offset = {}, 0
        for src, n in enumerate(out_splits):
            if src in recv_shapes:
                out[src] = flat_out[offset:offset + n].view(recv_shapes[src])
            offset += n
        return Pending([work], out, [flat_in])

    def wait(self, pending: "Pending") -> dict:
        """{src: tensor}: the receives of a `post` / `post_all_to_all`, once they have arrived
        (on CUDA: ordered before later work on the current stream)."""
        for req in pending.requests:
            req.wait()
        return pending.received

    def exchange(self, sends: dict, recv_shapes: dict, dtype, device, kind: str) -> dict:
        """`post` and `wait`: returns {src: tensor}."""
        return self.wait(self.post(sends, recv_shapes, dtype, device, kind))

    def all_to_all(self, sends: dict, recv_shapes: dict, dtype, device, kind: str) -> dict:
        """`post_all_to_all` and `wait`: returns {src: tensor}."""
        return self.wait(self.post_all_to_all(sends, recv_shapes, dtype, device, kind))

    def all_gather_ints(self, values: list[int], kind: str = "agree") -> torch.Tensor:
        """[P, len(values)] int64: every rank's values (the shape agreement before an exchange)."""
        mine = torch.tensor(values, dtype=torch.int64)
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            mine = mine.cuda()
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        self.stats.add(kind, mine.numel() * 8 * (self.world_size - 1))
        return torch.stack(gathered).cpu()


class MeshComm:
    """One rank's view of a 2-D DeviceMesh with dimensions ("ulysses", "cp") in either order: a
    `Comm` per dimension (`.ulysses`: the U ranks splitting heads, `.cp`: the C ranks splitting
    the sequence). Pass it as `group` to read the bytes sent (`total(kind)`, both Comms' stats).
    From a larger mesh, slice the two dimensions: `MeshComm(mesh["cp", "ulysses"])`."""

    def __init__(self, mesh) -> None:
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if not isinstance(mesh, _device_mesh_type()) or mesh.ndim != 2 or sorted(names) != sorted(MESH2D_DIMS):
            what = f"a {mesh.ndim}-D DeviceMesh with dims {names}" if isinstance(mesh, _device_mesh_type()) else \
                type(mesh).__name__
            raise ValueError(f"group: a Ulysses x cp mesh must be a 2-D DeviceMesh with dimension names "
                             f"{MESH2D_DIMS} (either order), got {what}")
        self.mesh = mesh
        self.ulysses = Comm(mesh["ulysses"])
        self.cp = Comm(mesh["cp"])

    @property
    def shard_index(self) -> int:
        """This rank's index in a `TwoLevelSharding` (cp rank * U + ulysses rank)."""
        return self.cp.rank * self.ulysses.world_size + self.ulysses.rank

    def total(self, *kinds: str) -> int:
        """Bytes this rank sent over both dimensions (of `kinds`; all when none)."""
        return self.ulysses.stats.total(*kinds) + self.cp.stats.total(*kinds)

    def reset(self) -> None:
        self.ulysses.stats.reset()
        self.cp.stats.reset()
