'use strict';
// Never loaded by Node: require('util') resolves to the core module first.
module.exports = require('node:util');
