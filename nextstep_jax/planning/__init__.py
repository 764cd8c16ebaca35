"""Planning for hardware we do not run on: AOT compiles against TPU topologies and the FLOPs and
bytes model they and the sweeps share."""
