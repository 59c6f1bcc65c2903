//! Motion in HumanML3D's representation (Guo et al. 2022), the form every motion model, evaluator
//! and export here speaks: the 22-joint SMPL chain ([`skeleton`]), the 263 features per frame and
//! joint positions back from them ([`features`]), files ([`npy`], [`io`]: joint JSON), sources
//! ([`deepmimic`], [`bvh`]) moved onto the chain ([`retarget`]), gestures laid over a
//! motion ([`gesture`]), BVH export, and stick-figure
//! renders ([`render`]).

pub mod bvh;
pub mod deepmimic;
pub mod features;
pub mod gesture;
pub mod io;
pub mod npy;
pub mod render;
pub mod retarget;
pub mod skeleton;
pub mod tensor;

pub use features::{features, joints_from_features, FeatureOptions, FEATURES, FPS};
pub use skeleton::{Pose, JOINTS};
