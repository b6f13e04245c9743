// Forwarding header: csrc/cuda/graph_spmm.cu and csrc/cuda/graph_dirichlet.cu
// still include it. Each op's contract now lives in its own header; include
// those (csrc/graph_spmm.h, csrc/graph_dirichlet.h) and delete this file.
#pragma once

#include "graph_dirichlet.h"
#include "graph_spmm.h"
