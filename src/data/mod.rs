//! Tasks and data: loaders, text templates, splits, metrics.

pub mod metrics;
