"""SPIN's 49-keypoint convention, defined once: 25 OpenPose joints followed by 24 "ground truth"
joints (the LSP / MPII / H36M / COCO superset), their flip permutation, and how a body model
produces each of them.

A body model produces keypoints from a 54-row "source" set, as in SPIN:
    rows  0..23  the 24 SMPL joints (posed kinematic joints),
    rows 24..44  the 21 vertex joints that smplx selects by vertex id (VERTEX_JOINT_NAMES),
    rows 45..53  the 9 rows of the extra joint regressor applied to the posed mesh (EXTRA_JOINT_NAMES).
`KEYPOINT_SOURCE[k]` is the source row of keypoint k.
"""
from __future__ import annotations

SMPL_JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)
# SMPL's kinematic tree: parent of each joint (-1 for the root).
SMPL_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)
SMPL_FLIP_PERM: tuple[int, ...] = (
    0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20, 23, 22,
)

# Order in which smplx's VertexJointSelector appends vertex joints to the 24 SMPL joints.
VERTEX_JOINT_NAMES: tuple[str, ...] = (
    "nose", "reye", "leye", "rear", "lear",
    "LBigToe", "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel",
    "lthumb", "lindex", "lmiddle", "lring", "lpinky",
    "rthumb", "rindex", "rmiddle", "rring", "rpinky",
)
EXTRA_JOINT_NAMES: tuple[str, ...] = (
    "Right Hip", "Left Hip", "Neck (LSP)", "Top of Head (LSP)", "Pelvis (MPII)",
    "Thorax (MPII)", "Spine (H36M)", "Jaw (H36M)", "Head (H36M)",
)
NUM_SOURCE_JOINTS = len(SMPL_JOINT_NAMES) + len(VERTEX_JOINT_NAMES) + len(EXTRA_JOINT_NAMES)

KEYPOINT_NAMES: tuple[str, ...] = (
    # 25 OpenPose joints, in OpenPose's order
    "OP Nose", "OP Neck", "OP RShoulder", "OP RElbow", "OP RWrist", "OP LShoulder", "OP LElbow",
    "OP LWrist", "OP MidHip", "OP RHip", "OP RKnee", "OP RAnkle", "OP LHip", "OP LKnee",
    "OP LAnkle", "OP REye", "OP LEye", "OP REar", "OP LEar", "OP LBigToe", "OP LSmallToe",
    "OP LHeel", "OP RBigToe", "OP RSmallToe", "OP RHeel",
    # 24 ground-truth joints
    "Right Ankle", "Right Knee", "Right Hip", "Left Hip", "Left Knee", "Left Ankle",
    "Right Wrist", "Right Elbow", "Right Shoulder", "Left Shoulder", "Left Elbow", "Left Wrist",
    "Neck (LSP)", "Top of Head (LSP)", "Pelvis (MPII)", "Thorax (MPII)", "Spine (H36M)",
    "Jaw (H36M)", "Head (H36M)", "Nose", "Left Eye", "Right Eye", "Left Ear", "Right Ear",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)  # 49

# Source row of every keypoint (SPIN's JOINT_MAP).
KEYPOINT_SOURCE: tuple[int, ...] = (
    24, 12, 17, 19, 21, 16, 18, 20, 0, 2, 5, 8, 1, 4, 7, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34,
    8, 5, 45, 46, 4, 7, 21, 19, 17, 16, 18, 20, 47, 48, 49, 50, 51, 52, 53, 24, 26, 25, 28, 27,
)

_GT24_FLIP_PERM = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13, 14, 15, 16, 17, 18, 19, 21, 20, 23, 22)
FLIP_PERM: tuple[int, ...] = (
    0, 1, 5, 6, 7, 2, 3, 4, 8, 12, 13, 14, 9, 10, 11, 16, 15, 18, 17, 22, 23, 24, 19, 20, 21,
) + tuple(25 + i for i in _GT24_FLIP_PERM)

# The 14 LSP joints used for MPJPE / PA-MPJPE: the first 14 ground-truth joints.
LSP14: tuple[int, ...] = tuple(range(25, 39))
# Ground-truth 24-joint block (SPIN's `S` arrays hold these, with a confidence column).
GT24: tuple[int, ...] = tuple(range(25, 49))
# The OpenPose block.
OP25: tuple[int, ...] = tuple(range(25))

# COCO's 17 person keypoints, in COCO's order, and the keypoint each one is in this layout (SPIN's
# `datasets/preprocess/coco.py`): the face into the ground-truth block's nose, eyes and ears, the
# limbs into its LSP joints. A labelled COCO joint, visible or not, has confidence 1 there.
COCO17_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO17_TO_KEYPOINTS: tuple[int, ...] = tuple(KEYPOINT_NAMES.index(n) for n in (
    "Nose", "Left Eye", "Right Eye", "Left Ear", "Right Ear", "Left Shoulder", "Right Shoulder",
    "Left Elbow", "Right Elbow", "Left Wrist", "Right Wrist", "Left Hip", "Right Hip",
    "Left Knee", "Right Knee", "Left Ankle", "Right Ankle",
))

# Torso keypoints of SMPLify's camera stage: OpenPose's when all four are detected, else the
# ground-truth convention's (SPIN's camera_fitting_loss).
OP_TORSO: tuple[int, ...] = tuple(
    KEYPOINT_NAMES.index(n) for n in ("OP RHip", "OP LHip", "OP RShoulder", "OP LShoulder")
)
GT_TORSO: tuple[int, ...] = tuple(
    KEYPOINT_NAMES.index(n) for n in ("Right Hip", "Left Hip", "Right Shoulder", "Left Shoulder")
)
# Keypoints that SPIN's body stage and its reported loss ignore: hips and neck sit differently on
# SMPL than in the annotations.
FIT_IGNORED: tuple[int, ...] = tuple(
    KEYPOINT_NAMES.index(n) for n in ("OP Neck", "OP RHip", "OP LHip", "Right Hip", "Left Hip")
)

# SPIN's evaluation joints (constants.py). H36M17 is the row order of J_regressor_h36m, each row
# named by the ground-truth joint (J24 = rows 25..48 above, from 0) that SPIN's lists pair it with.
H36M_JOINT_NAMES: tuple[str, ...] = (
    "Pelvis", "Left Hip", "Left Knee", "Left Ankle", "Right Hip", "Right Knee", "Right Ankle",
    "Spine (H36M)", "Neck (LSP)", "Jaw (H36M)", "Head (H36M)", "Left Shoulder", "Left Elbow", "Left Wrist",
    "Right Shoulder", "Right Elbow", "Right Wrist",
)
H36M_TO_J17: tuple[int, ...] = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10, 0, 7, 9)
H36M_TO_J14: tuple[int, ...] = H36M_TO_J17[:14]
J24_TO_J17: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 14, 16, 17)
J24_TO_J14: tuple[int, ...] = J24_TO_J17[:14]   # row 18, "Head (H36M)", never 13, the LSP head top

# Bones for drawing, as keypoint index pairs (the 14 LSP joints plus the head).
SKELETON: tuple[tuple[int, int], ...] = tuple(
    (KEYPOINT_NAMES.index(a), KEYPOINT_NAMES.index(b)) for a, b in (
        ("Right Ankle", "Right Knee"), ("Right Knee", "Right Hip"), ("Right Hip", "Left Hip"),
        ("Left Hip", "Left Knee"), ("Left Knee", "Left Ankle"), ("Right Wrist", "Right Elbow"),
        ("Right Elbow", "Right Shoulder"), ("Right Shoulder", "Left Shoulder"),
        ("Left Shoulder", "Left Elbow"), ("Left Elbow", "Left Wrist"),
        ("Right Shoulder", "Right Hip"), ("Left Shoulder", "Left Hip"),
        ("Neck (LSP)", "Top of Head (LSP)"), ("Right Shoulder", "Neck (LSP)"),
        ("Left Shoulder", "Neck (LSP)"), ("Nose", "Neck (LSP)"),
    )
)


def _check() -> None:
    assert len(KEYPOINT_NAMES) == 49 and len(KEYPOINT_SOURCE) == 49 and len(FLIP_PERM) == 49
    gt24 = KEYPOINT_NAMES[GT24[0]:]
    assert all(H36M_JOINT_NAMES[h] == gt24[j] for h, j in zip(H36M_TO_J17, J24_TO_J17) if h != 0)
    assert sorted(FLIP_PERM) == list(range(49))
    assert max(KEYPOINT_SOURCE) < NUM_SOURCE_JOINTS
    assert len(COCO17_NAMES) == len(COCO17_TO_KEYPOINTS) == 17


_check()
