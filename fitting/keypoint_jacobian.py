"""The 49 keypoints and their exact Jacobian with respect to the axis-angle pose and the betas,
in closed form, for least-squares solvers.

Every keypoint is a sum of "pairs": a point carried rigidly by one joint's frame, with a mass
(its share of skinning and regressor weight). A posed joint is one pair (itself, mass 1);
a vertex keypoint or an extra-regressor row is a few pairs, one per joint its vertices are
skinned to. Turning joint m's axis-angle by d(theta) turns everything below m about the posed
joint c_m with angular velocity

    omega = Rg_parent(m) Jl(theta_m) d(theta)      (Jl: SO(3)'s left Jacobian),

so d(keypoint) = omega x lever_m, lever_m = sum over its pairs below m of (point - mass c_m),
plus the pose correctives' change where the model has any. The betas move the rest joints and
rest points linearly. All of it is a few batched tensor ops: no autograd and no per-column
passes (a forward-mode Jacobian would pose the body once per unknown).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from smplx.lbs import batch_rodrigues
from torch import nn

from fitting.body_model import NUM_JOINTS
from fitting.keypoint_body import KeypointBody, rigid_transforms


def skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices: skew(a) @ b = a x b."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape, 3)


def left_jacobian(rotvec: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) Jl with d exp([theta]) = [Jl d(theta)] exp([theta]).

    Jl = I + (1 - cos a)/a^2 K + (a - sin a)/a^3 K^2, K = [theta], a = |theta|; the scalar
    factors are computed in float64 with their series near 0, where float32 cancels."""
    a = rotvec.double().norm(dim=-1)
    small = a < 1e-2
    safe = torch.where(small, torch.ones_like(a), a)
    a2 = a.square()
    first = torch.where(small, 0.5 - a2 / 24 + a2.square() / 720, 2 * (torch.sin(safe / 2) / safe).square())
    second = torch.where(small, 1 / 6 - a2 / 120 + a2.square() / 5040, (safe - torch.sin(safe)) / safe ** 3)
    k = skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    first, second = first.to(rotvec.dtype)[..., None, None], second.to(rotvec.dtype)[..., None, None]
    return eye + first * k + second * (k @ k)


@dataclass
class KeypointLinearization:
    """The keypoints and their Jacobian in factored form (B samples, K keypoints, S slots):
    slot s pairs keypoint key[s] with a joint joint[s] above it, and
    d keypoint_key[s] / d theta_joint[s][c] = omega[joint[s]][:, c] x lever[s] (+ corrective).
    Other (keypoint, joint) derivatives are zero: only about a quarter of them are not."""
    keypoints: torch.Tensor          # (B, K, 3)
    lever: torch.Tensor              # (B, S, 3)
    omega: torch.Tensor              # (B, 24, 3, 3)
    key: torch.Tensor                # (S,) long
    joint: torch.Tensor              # (S,) long
    d_betas: torch.Tensor            # (B, K, 3, 10)
    corrective: torch.Tensor | None  # (B, K, 3, 24, 3) or None when the model has no correctives

    def pull(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, K, R, 3) row vectors per keypoint -> (B, K, R, 72) rows @ d keypoint / d pose,
        without forming the (B, K, 3, 72) Jacobian: row . (omega_c x lever) = (lever x row) . omega_c."""
        batch, count, width = rows.shape[:3]
        picked = rows.index_select(1, self.key)                                 # (B, S, R, 3)
        cross = torch.linalg.cross(self.lever[:, :, None].expand_as(picked), picked, dim=-1)
        values = cross @ self.omega.index_select(1, self.joint)                 # (B, S, R, 3)
        place = (self.key[:, None] * width + torch.arange(width, device=rows.device)) * NUM_JOINTS
        place = ((place + self.joint[:, None]) * 3)[..., None] + torch.arange(3, device=rows.device)
        out = rows.new_zeros(batch, count * width * NUM_JOINTS * 3)
        out.index_copy_(1, place.flatten(), values.reshape(batch, -1))
        out = out.reshape(batch, count, width, 3 * NUM_JOINTS)
        if self.corrective is not None:
            out = out + rows @ self.corrective.flatten(-2)
        return out

    def d_pose(self) -> torch.Tensor:
        """(B, K, 3, 72) d keypoints / d pose (axis-angle, SMPL's joint order)."""
        eye = torch.eye(3, dtype=self.lever.dtype, device=self.lever.device)
        return self.pull(eye.expand(*self.keypoints.shape[:2], 3, 3))


def _ancestors(parents: list[int]) -> torch.Tensor:
    """(24, 24) [m, k] = 1 where joint m is k or above k in the tree."""
    out = [[0.0] * NUM_JOINTS for _ in range(NUM_JOINTS)]
    for k in range(NUM_JOINTS):
        m = k
        while m >= 0:
            out[m][k] = 1.0
            m = parents[m]
    return torch.tensor(out)


class KeypointJacobian(nn.Module):
    """forward(pose (B, 72) axis-angle, betas (B, 10)) -> KeypointLinearization of the keypoints
    `keypoints` (indices into the 49; default all), equal to KeypointBody's keypoints and to
    their autograd Jacobian to float precision."""

    def __init__(self, body: KeypointBody, keypoints: torch.Tensor | list[int] | None = None):
        super().__init__()
        device, dtype = body.v_template.device, body.v_template.dtype
        num_support = body.v_template.shape[0]
        source = body.keypoint_source if keypoints is None else body.keypoint_source[torch.as_tensor(keypoints)]
        # Sources as weights over support vertices: 24 joints (none), the vertex rows, the extra rows.
        rows = torch.zeros(body.vertex_rows.numel(), num_support, dtype=dtype, device=device)
        rows[torch.arange(body.vertex_rows.numel(), device=device), body.vertex_rows] = 1.0
        joint_rows = torch.zeros(NUM_JOINTS, num_support, dtype=dtype, device=device)
        combine = torch.cat([joint_rows, rows, body.extra])[source]
        per_joint = combine[:, :, None] * body.lbs_weights[None]             # (K, Ns, 24)
        is_joint = source < NUM_JOINTS
        vertex_key, vertex_joint = torch.nonzero((per_joint.abs().sum(dim=1) > 0) & ~is_joint[:, None], as_tuple=True)
        joint_key = torch.nonzero(is_joint).flatten()
        pair_key = torch.cat([joint_key, vertex_key])
        pair_joint = torch.cat([source[joint_key], vertex_joint])
        weights = torch.cat([combine[joint_key], per_joint[vertex_key, :, vertex_joint]])   # (P, Ns)
        joint_pair = torch.arange(pair_key.numel(), device=device) < joint_key.numel()
        mass = torch.where(joint_pair, 1.0, weights.sum(dim=1))
        # A pair's point before its joint's rotation: its rest point minus mass times the rest joint.
        offset = weights @ body.v_template - mass[:, None] * body.joint_template[pair_joint]
        offset = torch.where(joint_pair[:, None], 0.0, offset)
        offset_shape = (torch.einsum("pi,icl->pcl", weights, body.shapedirs)
                        - mass[:, None, None] * body.joint_shapedirs[pair_joint])
        offset_shape = torch.where(joint_pair[:, None, None], 0.0, offset_shape)
        self.has_correctives = bool((body.posedirs != 0).any())
        posedirs = body.posedirs.reshape(-1, num_support, 3)
        if self.has_correctives:
            posedirs = torch.einsum("pi,fic->pfc", weights, posedirs)                   # (P, 207, 3)
        else:
            posedirs = weights.new_zeros(0, posedirs.shape[0], 3)

        ancestor = _ancestors(body.parents.tolist()).to(device, dtype)
        entry_pair, entry_joint = torch.nonzero(ancestor[:, pair_joint].T > 0, as_tuple=True)
        # Slots: the (keypoint, joint above it) combinations that any entry reaches.
        used = torch.zeros(source.numel(), NUM_JOINTS, dtype=torch.bool, device=device)
        used[pair_key[entry_pair], entry_joint] = True
        slot_key, slot_joint = torch.nonzero(used, as_tuple=True)
        slot_of = torch.full((source.numel(), NUM_JOINTS), -1, dtype=torch.long, device=device)
        slot_of[slot_key, slot_joint] = torch.arange(slot_key.numel(), device=device)
        self.num_keypoints = int(source.numel())
        self.parent_list = body.parent_list
        self.register_buffer("parent_index", body.parents.clamp_min(0))
        self.register_buffer("joint_template", body.joint_template)
        self.register_buffer("joint_shapedirs", body.joint_shapedirs)
        self.register_buffer("pair_key", pair_key)
        self.register_buffer("pair_joint", pair_joint)
        self.register_buffer("pair_mass", mass)
        self.register_buffer("pair_offset", offset)
        self.register_buffer("pair_offset_shape", offset_shape)
        self.register_buffer("pair_posedirs", posedirs)
        features = posedirs.transpose(0, 1).reshape(posedirs.shape[1], 3 * posedirs.shape[0])
        self.register_buffer("feature_posedirs", features)
        self.register_buffer("entry_pair", entry_pair)
        self.register_buffer("entry_joint", entry_joint)
        # Betas, as two constant matrices over (joint, axis) of the world and parent-world rotations:
        # a pair's rest offset turns with its joint; the posed joints move with every rest bone above.
        num_betas = body.joint_shapedirs.shape[-1]
        keys = source.numel()
        by_joint = torch.zeros(NUM_JOINTS, 3, keys, num_betas, dtype=dtype, device=device)
        by_joint.transpose(1, 2).index_put_((pair_joint, pair_key), offset_shape, accumulate=True)
        joint_mass = torch.zeros(keys, NUM_JOINTS, dtype=dtype, device=device)
        joint_mass.index_put_((pair_key, pair_joint), mass, accumulate=True)
        above = body.joint_shapedirs[body.parents.clamp_min(0)[1:]]
        bone = body.joint_shapedirs - torch.cat([torch.zeros_like(above[:1]), above])      # (24, 3, L)
        by_parent = torch.einsum("mj,kj,myl->mykl", ancestor, joint_mass, bone)
        self.register_buffer("shape_world", by_joint.reshape(3 * NUM_JOINTS, -1))
        self.register_buffer("shape_parent", by_parent.reshape(3 * NUM_JOINTS, -1))
        self.register_buffer("entry_slot", slot_of[pair_key[entry_pair], entry_joint])
        self.register_buffer("slot_key", slot_key)
        self.register_buffer("slot_joint", slot_joint)

    def forward(self, pose: torch.Tensor, betas: torch.Tensor, local_root: bool = False) -> KeypointLinearization:
        """local_root: differentiate with respect to a rotation increment d applied on the left of
        the root's, exp([d]) R_0, instead of the root's axis-angle (omega_0 = I, not Jl)."""
        batch, dtype, device = pose.shape[0], pose.dtype, pose.device
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(batch, NUM_JOINTS, 3, 3)
        rest_joints = self.joint_template + torch.einsum("bl,jcl->bjc", betas, self.joint_shapedirs)
        joints, transforms = rigid_transforms(rot, rest_joints, self.parent_list)
        world = transforms[:, :, :3, :3]
        eye = torch.eye(3, dtype=dtype, device=device)
        parent_world = torch.cat([eye.expand(batch, 1, 3, 3), world[:, self.parent_index[1:]]], dim=1)

        local = self.pair_offset + torch.einsum("pcl,bl->bpc", self.pair_offset_shape, betas)
        if self.has_correctives:
            feature = (rot[:, 1:] - eye).reshape(batch, -1)
            local = local + (feature @ self.feature_posedirs).reshape(batch, -1, 3)
        pair_world = world.index_select(1, self.pair_joint)                     # (B, P, 3, 3)
        pair_centre = joints.index_select(1, self.pair_joint)
        points = (pair_world * local[:, :, None]).sum(-1) + self.pair_mass[:, None] * pair_centre
        keypoints = points.new_zeros(batch, self.num_keypoints, 3).index_add_(1, self.pair_key, points)

        entry = (points.index_select(1, self.entry_pair)
                 - self.pair_mass[self.entry_pair, None] * joints.index_select(1, self.entry_joint))
        lever = points.new_zeros(batch, self.slot_key.numel(), 3).index_add_(1, self.entry_slot, entry)
        omega = parent_world @ left_jacobian(pose.reshape(batch, NUM_JOINTS, 3))
        if local_root:
            omega = torch.cat([eye.expand(batch, 1, 3, 3), omega[:, 1:]], dim=1)

        # Betas: two matrix products over (joint, axis); the result is viewed as (B, K, 3, L).
        d_betas = (world.transpose(1, 2).reshape(batch, 3, -1) @ self.shape_world
                   + parent_world.transpose(1, 2).reshape(batch, 3, -1) @ self.shape_parent)
        d_betas = d_betas.reshape(batch, 3, self.num_keypoints, -1).transpose(1, 2)
        corrective = self._corrective(pose, rot, pair_world) if self.has_correctives else None
        return KeypointLinearization(keypoints, lever, omega, self.slot_key, self.slot_joint, d_betas, corrective)

    def _corrective(self, pose: torch.Tensor, rot: torch.Tensor, pair_world: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, 24, 3): the pose correctives' share of d keypoints / d pose."""
        batch = pose.shape[0]
        left = left_jacobian(pose.reshape(batch, NUM_JOINTS, 3)[:, 1:])                    # (B, 23, 3, 3)
        d_rot = skew(left.mT) @ rot[:, 1:, None]                                            # (B, 23, 3c, 3, 3)
        d_feature = d_rot.reshape(batch, NUM_JOINTS - 1, 3, 9)
        blocks = self.pair_posedirs.reshape(-1, NUM_JOINTS - 1, 9, 3)                       # (P, 23, 9, 3)
        d_local = torch.einsum("pmfx,bmcf->bpmcx", blocks, d_feature)
        d_points = torch.einsum("bpxy,bpmcy->bpxmc", pair_world, d_local)
        d_points = torch.cat([torch.zeros_like(d_points[:, :, :, :1]), d_points], dim=3)    # the root has none
        out = d_points.new_zeros(batch, self.num_keypoints, 3, NUM_JOINTS, 3)
        return out.index_add_(1, self.pair_key, d_points)
