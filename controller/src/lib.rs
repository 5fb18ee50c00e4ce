//! The Beamlit offloading controller. The `ModelDeployment` types live in `beamlit-api`, shared
//! with the agent.
//!
//! - [`ack_triggers`]: which models an agent's acknowledgement re-queues, batched;
//! - [`admission`]: what a ModelDeployment may reference and where its traffic and credentials
//!   may go (the cluster admin's boundary), checked before anything else;
//! - [`backend`]: the remote backend in force (the spec's or the configured default);
//! - [`beamlit_api`]: the Beamlit API client (OAuth token, models, the `offloading` label);
//! - [`beamlit_sync`]: the model on Beamlit kept in line (pure plan, backoff, finalizer);
//! - [`config`]: the configuration file, refused with the bad key named;
//! - [`decision`]: the offload decision, a pure function of spec, readiness, metrics, the
//!   previous decision and the time;
//! - [`metric_math`]: the HPA's arithmetic for metric values against targets;
//! - [`metric_source`]: where metric values come from (Prometheus, for now);
//! - [`resolve`]: the Service and its ready endpoints, from watched objects;
//! - [`status`]: the status written, from observations and the decision;
//! - [`reconcile`]: the controller loop; [`metrics`]: its Prometheus metrics and probes;
//! - [`leader`]: leader election on a Lease, so that one replica decides.
pub mod ack_triggers;
pub mod admission;
pub mod backend;
pub mod beamlit_api;
pub mod beamlit_sync;
pub mod config;
pub mod decision;
pub mod leader;
pub mod metric_math;
pub mod metric_source;
pub mod metrics;
pub mod reconcile;
pub mod resolve;
pub mod status;
