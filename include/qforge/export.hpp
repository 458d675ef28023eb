// QFORGE_API marks what libqforge exports to C++ programs. The library is
// built with hidden visibility (only what is marked is reachable from
// outside), so every public class and function of the headers under
// include/qforge/ carries it; internals stay private to the library.
#pragma once

#if defined(_WIN32)
#define QFORGE_API __declspec(dllexport)
#else
#define QFORGE_API __attribute__((visibility("default")))
#endif
