/*
 * gemv4_tiled_pdl.cu: the kernels of gemv4_tiled.cu built for compute_90 with programmatic
 * dependent launch on (pdl.cuh: pdl_wait and pdl_launch_dependents emit griddepcontrol). Loaded
 * on compute capability 9.0 and newer; backend::cuda::pdl launches a decode step's fused tiled
 * GEMVs from here while PDL is on, with the same names and arguments as in gemv4_tiled.cu, else
 * from gemv4_tiled.cu.
 * Checked against: the same decode with gemv4_tiled.cu's kernels, bit for bit (sun selftest,
 * "model decode PDL = no PDL" rows, the tiled copy prepared).
 */
// build: -arch=compute_90

#define SUN_PDL 1
#include "gemv4_tiled.cu"
