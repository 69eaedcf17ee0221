//! lablink-postgres (in progress)
