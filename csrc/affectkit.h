// affectkit: the C++ core. Include this to use every kernel family from C++.
#pragma once

#include "core/core.h"
#include "pooling/pooling.h"
#include "attention/attention.h"
#include "graph/graph.h"
#include "knn/f16.h"
#include "knn/knn.h"
#include "knn/walk_codes.h"
