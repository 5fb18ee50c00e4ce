//! The Beamlit agent: eBPF redirection of Service connections toward an egress tunnel.
//!
//! - [`cgroup`] decides where the programs attach (the pods' cgroup, found; or the node);
//! - [`dataplane`] loads, attaches, pins and adopts the eBPF programs (`agent-ebpf`);
//! - [`maps`] reads and writes the pinned maps; [`model`] translates routes to map entries;
//! - [`plan`] computes the map changes for a set of routes (pure);
//! - [`apply`] applies a set of routes to the tunnel and the maps;
//! - [`routes`] parses the standalone routes file; [`standalone`] keeps the maps in line with it;
//! - [`cluster`] keeps them in line with ModelDeployments and EndpointSlices (cluster mode);
//! - [`inspect`] prints the maps in human terms;
//! - [`tunnel`] is the egress tunnel that forwards redirected connections to remote backends.
pub mod apply;
pub mod cgroup;
pub mod cluster;
pub mod dataplane;
pub mod inspect;
pub mod maps;
pub mod model;
pub mod plan;
pub mod routes;
pub mod standalone;
pub mod sys;
pub mod tunnel;
