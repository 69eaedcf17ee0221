//! The LabLink VM agent.
