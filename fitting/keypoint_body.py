"""The 49 keypoints of a body model without posing its whole mesh.

Every keypoint depends on the 24 joints and on a few vertices only: the vertex joints and the
support of the extra joint regressor. Linear blend skinning is per vertex, so skinning just
those vertices gives exactly the keypoints of `BodyModel.forward` at a fraction of the cost
(a fit evaluates the keypoints hundreds of times and never looks at the mesh).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from smplx.lbs import batch_rodrigues, transform_mat
from torch import nn

from fitting.body_model import NUM_JOINTS, BodyModel
from fitting.capture_safe import take
from fitting.keypoints import NUM_SOURCE_JOINTS


def rigid_transforms(rot: torch.Tensor, joints: torch.Tensor,
                     parents: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """smplx.lbs.batch_rigid_transform with the kinematic tree as Python ints: (B, J, 3, 3) local
    rotations and (B, J, 3) rest joints -> ((B, J, 3) posed joints, (B, J, 4, 4) transforms
    relative to the rest pose). smplx picks each parent's transform with a tensor element, which
    on a GPU reads it back to the host: a synchronisation per joint, and no CUDA-graph capture."""
    joints = joints[..., None]
    relative = torch.cat([joints[:, :1], joints[:, 1:] - take(joints, parents[1:], 1)], dim=1)
    local = transform_mat(rot.reshape(-1, 3, 3), relative.reshape(-1, 3, 1)).reshape(-1, joints.shape[1], 4, 4)
    chain = [local[:, 0]]
    for joint in range(1, len(parents)):
        chain.append(chain[parents[joint]] @ local[:, joint])
    transforms = torch.stack(chain, dim=1)
    rest = F.pad(transforms @ F.pad(joints, [0, 0, 0, 1]), [3, 0, 0, 0, 0, 0, 0, 0])
    return transforms[:, :, :3, 3], transforms - rest


class KeypointBody(nn.Module):
    """forward(pose (B, 72) axis-angle or (B, 24, 3, 3), betas (B, 10)) -> (B, 49, 3) keypoints,
    the same as BodyModel.forward(...).keypoints."""

    def __init__(self, model: BodyModel):
        super().__init__()
        smpl = model.smpl
        num_vertices = smpl.v_template.shape[0]
        vertex_ids = smpl.vertex_joint_selector.extra_joints_idxs.to(torch.long)
        extra = model.J_regressor_extra
        used = torch.zeros(num_vertices, dtype=torch.bool, device=extra.device)
        used[vertex_ids] = True
        used |= (extra != 0).any(dim=0)
        support = torch.nonzero(used).flatten()
        position = torch.full((num_vertices,), -1, dtype=torch.long, device=extra.device)
        position[support] = torch.arange(support.numel(), device=extra.device)

        shapedirs = smpl.shapedirs  # (V, 3, 10)
        # The joints are linear in the shaped vertices: regress template and shape space once.
        self.register_buffer("joint_template", smpl.J_regressor @ smpl.v_template)
        self.register_buffer("joint_shapedirs", torch.einsum("jv,vcl->jcl", smpl.J_regressor, shapedirs))
        self.register_buffer("v_template", smpl.v_template[support])
        self.register_buffer("shapedirs", shapedirs[support])
        posedirs = smpl.posedirs.reshape(smpl.posedirs.shape[0], num_vertices, 3)[:, support]
        self.register_buffer("posedirs", posedirs.reshape(posedirs.shape[0], -1))
        self.register_buffer("lbs_weights", smpl.lbs_weights[support])
        self.register_buffer("parents", smpl.parents.clone())
        self.parent_list = tuple(int(p) for p in smpl.parents.tolist())
        self.register_buffer("vertex_rows", position[vertex_ids])
        self.register_buffer("extra", extra[:, support])
        self.register_buffer("keypoint_source", model.keypoint_source.clone())
        self.num_support = int(support.numel())

    def forward(self, pose: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        batch = pose.shape[0]
        if pose.ndim == 2:
            rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(batch, NUM_JOINTS, 3, 3)
        else:
            rot = pose.reshape(batch, NUM_JOINTS, 3, 3)
        joints = self.joint_template + torch.einsum("bl,jcl->bjc", betas, self.joint_shapedirs)
        shaped = self.v_template + torch.einsum("bl,scl->bsc", betas, self.shapedirs)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(batch, -1)
        posed = shaped + (pose_feature @ self.posedirs).reshape(batch, -1, 3)
        posed_joints, transforms = rigid_transforms(rot, joints, self.parent_list)
        # Only the 3x4 top of each 4x4 transform is blended: the last row is constant.
        top = transforms[:, :, :3, :].reshape(batch, NUM_JOINTS, 12)
        skin = torch.matmul(self.lbs_weights, top).reshape(batch, -1, 3, 4)
        vertices = torch.matmul(skin[..., :3], posed[..., None])[..., 0] + skin[..., 3]
        source = torch.cat([
            posed_joints,
            vertices[:, self.vertex_rows],
            torch.einsum("ks,bsc->bkc", self.extra, vertices),
        ], dim=1)
        return source[:, self.keypoint_source]


class MeshKeypoints(nn.Module):
    """The same (B, 49, 3) keypoints through `BodyModel.forward`, skinning the whole mesh at
    every call as SPIN's SMPLify does: the reference that KeypointBody's speed is measured against."""

    def __init__(self, model: BodyModel):
        super().__init__()
        self.model = model

    def forward(self, pose: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        return self.model(pose, betas).keypoints


def rigid_keypoints(body: KeypointBody, body_pose: torch.Tensor, betas: torch.Tensor):
    """Keypoints as a function of the global orientation alone, for fixed (B, 69) body pose and
    (B, 10) betas. The posed body is rigid about its root joint J0, so
    keypoints(R) = R (k0 - s J0) + s J0, with k0 the keypoints at R = I and s the weight sum
    of each keypoint's regressor (1 for joints and vertices). Costs one forward, not one per call."""
    with torch.no_grad():
        zero = torch.zeros_like(body_pose[:, :3])
        k0 = body(torch.cat([zero, body_pose], dim=1), betas)
        root = body.joint_template[0] + torch.einsum("bl,cl->bc", betas, body.joint_shapedirs[0])
        kinematic = torch.ones(NUM_SOURCE_JOINTS - body.extra.shape[0], dtype=k0.dtype, device=k0.device)
        sums = torch.cat([kinematic, body.extra.sum(dim=1)])
        anchor = sums[body.keypoint_source][None, :, None] * root[:, None, :]
        local = k0 - anchor

    def keypoints(global_orient: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R, 3) orientations of the samples `rows` (default: all) -> (R, 49, 3)."""
        part_local, part_anchor = (local, anchor) if rows is None else (local[rows], anchor[rows])
        rot = batch_rodrigues(global_orient)
        return torch.einsum("bij,bkj->bki", rot, part_local) + part_anchor
    return keypoints


def small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, K) @ (..., K, M) for tiny K (3x3 rotations). Under torch.compile, a broadcast
    product and sum, which the graph fuses with its neighbours (a batched GEMM of 3x3 blocks is a
    call of its own, far below a GEMM's speed); eager, the GEMM, which makes no temporaries."""
    if torch.compiler.is_compiling():
        return (a[..., :, :, None] * b[..., None, :, :]).sum(dim=-2)
    return a @ b


def kinematic_levels(parents: list[int]) -> list[list[int]]:
    """Joints grouped by depth in the kinematic tree, root (depth 0) first."""
    depth = [0] * len(parents)
    for joint in range(1, len(parents)):
        depth[joint] = depth[parents[joint]] + 1
    return [[j for j in range(len(parents)) if depth[j] == d] for d in range(max(depth) + 1)]


class FastKeypointBody(nn.Module):
    """KeypointBody's 49 keypoints without skinning any vertex: for large training batches.

    A keypoint made from vertices is a fixed linear combination of them (one vertex, or a row of
    the extra regressor), k_m = sum_s M_ms v_s, and linear blend skinning is linear in the joint
    transforms, v_s = sum_j w_sj (R_j (p_s - J_j) + g_j), with R_j, g_j joint j's global rotation
    and posed position, J_j its rest position and p_s the shaped, pose-blended rest vertex. So
        k_m = sum_j [R_j Q_mj + c_mj (g_j - R_j J_j)],   c_mj = sum_s M_ms w_sj,
        Q_mj = sum_s M_ms w_sj p_s   (linear in the betas and in the pose-blend features),
    and only the (keypoint, joint) pairs with a nonzero c or Q count: a few per keypoint with
    hard skinning weights, every joint with soft ones; pose blend shapes and soft weights are
    represented exactly either way. The kinematic chain runs one tree level at a time.

    forward(pose (B, 72) axis-angle or (B, 24, 3, 3), betas (B, 10)) -> (B, 49, 3), the same as
    KeypointBody (to float rounding)."""

    def __init__(self, model: BodyModel):
        super().__init__()
        base = KeypointBody(model)
        support = base.num_support
        select = torch.cat([nn.functional.one_hot(base.vertex_rows, support).to(base.extra.dtype), base.extra])  # (M, S)
        mixed = select[:, :, None] * base.lbs_weights[None]                          # (M, S, 24)
        c = mixed.sum(dim=1)                                                          # (M, 24)
        q_template = torch.einsum("msj,sc->mjc", mixed, base.v_template)              # (M, 24, 3)
        q_shape = torch.einsum("msj,scl->mjcl", mixed, base.shapedirs)                # (M, 24, 3, 10)
        posedirs = base.posedirs.reshape(-1, support, 3)                              # (207, S, 3)
        self.pose_blend = bool(posedirs.abs().max() > 0)  # the built-in model has none: skip the product
        q_pose = torch.einsum("msj,qsc->mjcq", mixed, posedirs) if self.pose_blend else None
        used = (c != 0) | (q_template != 0).any(-1) | (q_shape != 0).flatten(2).any(-1)
        if q_pose is not None:
            used |= (q_pose != 0).flatten(2).any(-1)
        pair_m, pair_j = torch.nonzero(used, as_tuple=True)
        self.num_virtual = select.shape[0]
        self.register_buffer("pair_m", pair_m)
        self.register_buffer("pair_j", pair_j)
        self.register_buffer("pair_c", c[pair_m, pair_j][:, None])                                     # (P, 1)
        self.register_buffer("pair_q", q_template[pair_m, pair_j])                                     # (P, 3)
        self.register_buffer("pair_q_shape", q_shape[pair_m, pair_j].permute(2, 0, 1).flatten(1))     # (10, P*3)
        self.register_buffer("pair_q_pose", q_pose[pair_m, pair_j].permute(2, 0, 1).flatten(1)
                             if q_pose is not None else torch.zeros(0))                               # (207, P*3)
        self.register_buffer("joint_template", base.joint_template)
        self.register_buffer("joint_shapedirs", base.joint_shapedirs)
        self.register_buffer("keypoint_source", base.keypoint_source)
        parents = [int(p) for p in base.parents]
        self.levels = kinematic_levels(parents)[1:]
        self.level_parents = [[parents[j] for j in level] for level in self.levels]

    @property
    def num_pairs(self) -> int:
        return int(self.pair_m.numel())

    def global_transforms(self, rot: torch.Tensor, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 24, 3, 3) local rotations, (B, 24, 3) rest joints -> (B, 24, 3, 3) global rotations
        and (B, 24, 3) posed joints, one tree level at a time (each joint's result kept as a
        slice, joined once at the end)."""
        g_rot: list[torch.Tensor | None] = [rot[:, :1]] + [None] * (rot.shape[1] - 1)
        g_loc: list[torch.Tensor | None] = [joints[:, :1]] + [None] * (rot.shape[1] - 1)
        for level, parents in zip(self.levels, self.level_parents):
            parent_rot = torch.cat([g_rot[p] for p in parents], dim=1)
            parent_loc = torch.cat([g_loc[p] for p in parents], dim=1)
            offset = (joints[:, level] - joints[:, parents])[..., None]
            level_rot = small_matmul(parent_rot, rot[:, level])
            level_loc = parent_loc + small_matmul(parent_rot, offset)[..., 0]
            for i, joint in enumerate(level):
                g_rot[joint], g_loc[joint] = level_rot[:, i:i + 1], level_loc[:, i:i + 1]
        return torch.cat(g_rot, dim=1), torch.cat(g_loc, dim=1)

    def forward(self, pose: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        batch = pose.shape[0]
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(batch, NUM_JOINTS, 3, 3) if pose.ndim == 2 else pose
        joints = self.joint_template + torch.einsum("bl,jcl->bjc", betas, self.joint_shapedirs)
        g_rot, g_loc = self.global_transforms(rot, joints)
        trans = g_loc - small_matmul(g_rot, joints[..., None])[..., 0]            # (B, 24, 3)
        q = self.pair_q + (betas @ self.pair_q_shape).reshape(batch, -1, 3)        # (B, P, 3)
        if self.pose_blend:
            eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
            q = q + ((rot[:, 1:] - eye).reshape(batch, -1) @ self.pair_q_pose).reshape(batch, -1, 3)
        terms = (small_matmul(g_rot.index_select(1, self.pair_j), q[..., None])[..., 0]
                 + self.pair_c * trans.index_select(1, self.pair_j))
        virtual = terms.new_zeros(batch, self.num_virtual, 3).index_add(1, self.pair_m, terms)
        return torch.cat([g_loc, virtual], dim=1).index_select(1, self.keypoint_source)
