/*
 * rope_pdl.cu: the kernels of rope.cu built for compute_90 with programmatic dependent launch
 * on (pdl.cuh: pdl_wait and pdl_launch_dependents emit griddepcontrol). Loaded on compute
 * capability 9.0 and newer; backend::cuda::pdl launches a decode step's kernels from here while
 * PDL is on, with the same names and arguments as in rope.cu, else from rope.cu.
 * Checked against: the same decode with rope.cu's kernels, bit for bit (sun selftest,
 * "model decode PDL = no PDL" rows).
 */
// build: -arch=compute_90

#define SUN_PDL 1
#include "rope.cu"
