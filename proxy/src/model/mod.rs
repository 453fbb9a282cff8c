//! The pure core: Kubernetes objects in, a normalized [`DesiredState`] out,
//! and the [`diff`] between two states. No I/O here.

mod types;

pub use types::*;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The objects a source has gathered: the model's whole input.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// Settings that change how objects map to the desired state.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// This node's name: decides which endpoints are local and which Node
    /// object is ours.
    pub node_name: String,
}

/// Builds the desired state from objects. Invalid objects are left out and
/// listed in [`DesiredState::rejected`]; they never affect other Services.
pub fn build(objects: &ClusterObjects, config: &ModelConfig) -> DesiredState {
    let _ = (objects, config);
    todo!("model::build")
}

/// Validates one Service as the model would; an empty list means valid.
pub fn validate_service(svc: &Service) -> Vec<Rejection> {
    let _ = svc;
    todo!("model::validate_service")
}

/// Validates one EndpointSlice as the model would; an empty list means valid.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Vec<Rejection> {
    let _ = slice;
    todo!("model::validate_endpoint_slice")
}

/// Validates one Node as the model would; an empty list means valid.
pub fn validate_node(node: &Node) -> Vec<Rejection> {
    let _ = node;
    todo!("model::validate_node")
}

/// What changed between the last applied state and the new one, by Service port.
pub fn diff(old: &DesiredState, new: &DesiredState) -> Changes {
    let _ = (old, new);
    todo!("model::diff")
}
