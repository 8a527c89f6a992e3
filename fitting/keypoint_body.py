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
