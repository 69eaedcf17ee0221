//! lablink-terraform (in progress)
