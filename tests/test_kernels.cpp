#include <gtest/gtest.h>
#include "ultramem/kernels/tdqkr.h"
#include "ultramem/kernels/pooled_lookup.h"
TEST(Smoke, Builds) { EXPECT_EQ(ultramem::kernels::tdqkr_check_shape({}), ultramem::kernels::tdqkr_check_shape({})); }
