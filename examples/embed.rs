//! Embedding LabLink (being written).
fn main() {}
